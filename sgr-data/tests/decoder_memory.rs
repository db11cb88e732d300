//! What decoding one image may allocate is bounded by its pixels: a PNG whose compressed colour
//! profile inflates to hundreds of MiB (about a MiB on disk) decodes within a small
//! budget. The only test of this binary, so that its allocator counts this decode alone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;
use common::{png_chunk, zlib};

/// The system allocator with a live-bytes count and its high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn a_colour_profile_bomb_decodes_within_a_small_budget() {
    // An 8x8 RGB PNG with a 256 MiB colour profile of zeros, compressed.
    let rows: Vec<u8> = (0..8)
        .flat_map(|_| [0u8].into_iter().chain([9u8; 24]))
        .collect();
    let mut ihdr = 8u32.to_be_bytes().to_vec();
    ihdr.extend(8u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut icc = b"icc\0\0".to_vec();
    icc.extend(zlib(&vec![0u8; 256 << 20]));
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    png.extend(png_chunk(b"iCCP", &icc));
    png.extend(png_chunk(b"IDAT", &zlib(&rows)));
    png.extend(png_chunk(b"IEND", &[]));
    assert!(png.len() < 2 << 20, "{} bytes", png.len());

    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = sgr_data::decode_rgb_bytes(&png, Path::new("bomb.png"));
    let used = PEAK.load(Ordering::Relaxed) - before;
    assert!(
        used < 32 << 20,
        "decoding took {} MiB: {:?}",
        used >> 20,
        result.as_ref().map(|i| i.width)
    );
    // The pixels still decode (the profile is not used), or the profile is refused: either way
    // within the budget.
    match result {
        Ok(img) => assert_eq!((img.width, img.height), (8, 8)),
        Err(e) => assert!(e.to_string().contains("bomb.png"), "{e}"),
    }
}
