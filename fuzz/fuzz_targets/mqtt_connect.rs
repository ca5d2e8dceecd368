//! rumqttd 0.20's CONNECT decoder, which the broker guard runs on every first packet from the
//! network (after checking it is a CONNECT frame within broker.max_payload_size).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rumqttd::protocol::{v4::V4, v5::V5, Protocol};

fuzz_target!(|data: &[u8]| {
    let Some((v5, rest)) = data.split_first() else {
        return;
    };
    let mut frame = bytes::BytesMut::new();
    frame.extend_from_slice(&[0x10]);
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
    let _ = if v5 & 1 == 1 {
        V5.read_mut(&mut frame, 1 << 20)
    } else {
        V4.read_mut(&mut frame, 1 << 20)
    };
});
