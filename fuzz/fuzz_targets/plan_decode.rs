//! Prefetch plans and startup traces from hostile bytes: `Plan::decode` and
//! `Trace::decode` never panic, and whatever decodes re-encodes to something
//! that decodes to the same value. Each input is tried as it is (compressed
//! form) and zstd-compressed by the harness, so mutations also reach the
//! varint and JSON parsers behind the decompressor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stoker_format::{Plan, Trace};

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Ok(compressed) = zstd::bulk::compress(data, 1) {
        check(&compressed);
    }
});

fn check(bytes: &[u8]) {
    if let Ok(plan) = Plan::decode(bytes) {
        let encoded = plan.encode().expect("a decoded plan encodes");
        let again = Plan::decode(&encoded).expect("a re-encoded plan decodes");
        assert_eq!(again, plan);
    }
    if let Ok(trace) = Trace::decode(bytes) {
        let encoded = trace.encode().expect("a decoded trace encodes");
        let again = Trace::decode(&encoded).expect("a re-encoded trace decodes");
        assert_eq!(again, trace);
        let _ = trace.hot_bytes();
        if let Ok(plan) = Plan::merge(std::slice::from_ref(&trace), Some(1 << 20)) {
            let encoded = plan.encode().expect("a merged plan encodes");
            assert_eq!(Plan::decode(&encoded).expect("merged plan decodes"), plan);
        }
    }
}
