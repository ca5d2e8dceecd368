//! rumqttd 0.20's decoders for every packet type the broker guard lets through to rumqttd
//! (PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT), MQTT
//! 3.1.1 and 5. A panic here would kill a connection task after CONNECT: the will-handler trap
//! of failure mode 1 (which the liveness probe then has to heal).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rumqttd::protocol::{v4::V4, v5::V5, Protocol};

const ALLOWED: [u8; 9] = [3, 4, 5, 6, 7, 8, 10, 12, 14];

fuzz_target!(|data: &[u8]| {
    let Some((sel, rest)) = data.split_first() else {
        return;
    };
    let kind = ALLOWED[(*sel as usize >> 4) % ALLOWED.len()];
    let byte1 = (kind << 4) | (sel & 0x0f);
    let mut frame = bytes::BytesMut::new();
    frame.extend_from_slice(&[byte1]);
    let mut n = rest.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        frame.extend_from_slice(&[b]);
        if n == 0 {
            break;
        }
    }
    frame.extend_from_slice(rest);
    let mut v4 = frame.clone();
    let _ = V4.read_mut(&mut v4, 1 << 20);
    let _ = V5.read_mut(&mut frame, 1 << 20);
});
