#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| reliability::decoders::coordinator_snapshot(bytes));
