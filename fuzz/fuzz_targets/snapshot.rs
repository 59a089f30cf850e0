#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| reliability::decoders::snapshot(bytes));
