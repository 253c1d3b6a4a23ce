//! Parsing and encoding allocate nothing: a counting global allocator sees
//! zero allocations while every recorded QEMU message is parsed and encoded.

#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use vhost_user_core::message::{Header, ParseOptions, Reply, Request, HEADER_SIZE, MAX_MESSAGE};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours, passed through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours, passed through.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn parse_and_encode_do_not_allocate() {
    // Load outside the measured section (this allocates).
    let msgs: Vec<(Vec<u8>, usize)> = include_str!("vectors/qemu-start-qsd.txt")
        .lines()
        .filter(|l| l.starts_with("F>B"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let mut m = Vec::new();
            let p: Vec<u8> = match f.get(5) {
                Some(h) if *h != "-" => (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                    .collect(),
                _ => vec![],
            };
            let flags = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).unwrap();
            for v in [f[1].parse::<u32>().unwrap(), flags, p.len() as u32] {
                m.extend_from_slice(&v.to_ne_bytes());
            }
            m.extend_from_slice(&p);
            (m, f[4].parse().unwrap())
        })
        .collect();
    let opts = ParseOptions::default();
    let mut out = [0u8; MAX_MESSAGE];
    let before = ALLOCS.load(Ordering::SeqCst);
    let mut ok = 0;
    for (m, nfds) in &msgs {
        let h = Header::parse(m).unwrap();
        let r = Request::parse(&h, &m[HEADER_SIZE..], *nfds, &opts).unwrap();
        r.encode(h.need_reply(), &mut out).unwrap();
        Reply::U64(0).encode(r.code(), &mut out).unwrap();
        ok += 1;
    }
    let after = ALLOCS.load(Ordering::SeqCst);
    assert_eq!(ok, msgs.len());
    assert!(ok >= 30, "{ok} messages");
    assert_eq!(after - before, 0, "allocations during parse/encode");
}
