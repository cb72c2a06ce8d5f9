//! Test-only switches that break a safety mechanism on purpose, so the fault-injection
//! harness can show that its checker catches what follows (feature `unsafe-canaries`, enabled
//! only by the broker's test-only build; a release build has none of this).

use std::sync::atomic::{AtomicBool, Ordering};

static SKIP_BATCH_CRC: AtomicBool = AtomicBool::new(false);

/// From now on, batches whose CRC does not match their bytes decode as if it did: damaged
/// bytes reach readers.
pub fn skip_batch_crc() {
    SKIP_BATCH_CRC.store(true, Ordering::SeqCst);
}

/// Whether batch CRC checks are off.
pub(crate) fn batch_crc_skipped() -> bool {
    SKIP_BATCH_CRC.load(Ordering::Relaxed)
}
