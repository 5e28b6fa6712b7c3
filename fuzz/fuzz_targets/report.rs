#![no_main]
//! `keyward::fuzzing::report` under libFuzzer.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keyward::fuzzing::report(data));
