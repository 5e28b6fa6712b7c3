#![no_main]
//! `keyward::fuzzing::bundle` under libFuzzer.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| keyward::fuzzing::bundle(data));
