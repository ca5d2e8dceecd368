//! Payload decoder: never panics; whatever it classifies as JSON is JSON every consumer's
//! parser accepts (the envelope embeds it as is), and object fields can be read.
#![no_main]
use edgegate::core::decode::Payload;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = Payload::decode(bytes::Bytes::copy_from_slice(data));
    match &p {
        Payload::Object(b) | Payload::OtherJson(b) => {
            serde_json::from_slice::<serde_json::Value>(b).expect("classified JSON parses");
        }
        Payload::Number { value, json } => {
            assert!(value.is_finite());
            serde_json::from_slice::<serde_json::Value>(json).expect("number JSON parses");
        }
        Payload::Opaque(_) => {}
    }
    if let Payload::Object(_) = p {
        assert!(p.fields().is_some(), "object fields readable");
    }
    let _ = p.field("t");
    let _ = p.field_f64("value");
});
