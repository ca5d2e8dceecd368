//! Rule conditions: any text either fails to compile with a message or evaluates (true, false
//! or an error) without panicking, against readings made from the rest of the input.
#![no_main]
use edgegate::core::decode::Payload;
use edgegate::core::event::Reading;
use edgegate::config::condition::{Condition, Scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // "<condition>\n<payload>"
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let Ok(text) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let Ok(cond) = Condition::parse(text, None) else {
        return;
    };
    let payload = data.get(split + 1..).unwrap_or_default();
    let reading = Reading {
        topic: "sensors/dev-1/temp".into(),
        received: std::time::SystemTime::UNIX_EPOCH,
        payload: Payload::decode(bytes::Bytes::copy_from_slice(payload)),
        traceparent: None,
    };
    let mut scratch = Scratch::default();
    let _ = cond.eval(&reading, 1.7e9, &mut scratch);
    let _ = cond.eval(&reading, 0.0, &mut scratch);
});
