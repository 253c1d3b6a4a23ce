//! Parse anything as a message on either channel; whatever parses must encode
//! again and parse back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_user_core::message::{
    BackendRequest, FrontendReq, Header, ParseOptions, Reply, Request, HEADER_SIZE, MAX_MESSAGE,
};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, msg)) = data.split_first() else {
        return;
    };
    let nfds = usize::from(ctl & 0x0f);
    let opts = ParseOptions {
        max_queues: u32::from(ctl >> 4) * 16 + 1,
        xen_mmap: ctl & 0x80 != 0,
    };
    let Ok(h) = Header::parse(msg) else {
        return;
    };
    let payload = &msg[HEADER_SIZE..];
    let payload = &payload[..payload.len().min(h.size as usize)];
    let mut out = [0u8; MAX_MESSAGE];
    if let Ok(r) = Request::parse(&h, payload, nfds, &opts) {
        let n = r
            .encode(h.need_reply(), &mut out)
            .expect("a parsed request encodes");
        let h2 = Header::parse(&out[..n]).expect("our header parses");
        let again = Request::parse(&h2, &out[HEADER_SIZE..n], nfds, &opts).expect("reparses");
        assert_eq!(again, r);
    }
    if let Ok(code) = FrontendReq::try_from(h.request) {
        if let Ok(r) = Reply::parse(code, &h, payload, nfds, &opts) {
            let n = r.encode(code, &mut out).expect("a parsed reply encodes");
            let h2 = Header::parse(&out[..n]).expect("our header parses");
            let again =
                Reply::parse(code, &h2, &out[HEADER_SIZE..n], nfds, &opts).expect("reparses");
            assert_eq!(again, r);
        }
    }
    if let Ok(r) = BackendRequest::parse(&h, payload, nfds, &opts) {
        let n = r.encode(h.need_reply(), &mut out).expect("encodes");
        let h2 = Header::parse(&out[..n]).expect("our header parses");
        let again =
            BackendRequest::parse(&h2, &out[HEADER_SIZE..n], nfds, &opts).expect("reparses");
        assert_eq!(again, r);
    }
});
