//! Configuration loader: any text gives a Config or keyed errors, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match edgegate::Config::from_toml(text, None) {
        Ok(_) => {}
        Err(errors) => assert!(!errors.0.is_empty()),
    }
});
