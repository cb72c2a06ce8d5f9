//! The sync journal: a test-only record of what every partition file durably holds, for the
//! power-loss tests and the fault-injection harness.
//!
//! Built only with the `sync-journal` cargo feature (never in a release build of the broker).
//! With it, `WEFT_SYNC_JOURNAL=<file>` makes the broker append one line per durable event to that
//! file, written with one `write(2)` right after the sync returns and before anything that
//! depends on it (an acknowledgement) happens, so the journal survives `kill -9`:
//!
//! ```text
//! S <len> <path>   at least the first <len> bytes of <path> are durable (fdatasync, syncfs, fsync)
//! R <len> <path>   <path> now durably holds exactly <len> bytes (created, truncated, replaced)
//! ```
//!
//! A power-loss simulation cuts each file back to its durable length (plus a torn tail) and
//! removes files the journal never mentions. The journal only observes: nothing in it can skip
//! or delay a sync.

use std::sync::Arc;

use weft_storage::SyncListener;

/// The environment variable naming the journal file.
pub const ENV: &str = "WEFT_SYNC_JOURNAL";
/// The environment variable that switches batch CRC checks off (the fault-injection harness's
/// crc-off canary; refused by a build without the test-only feature).
pub const SKIP_CRC_ENV: &str = "WEFT_CANARY_SKIP_CRC";
/// The environment variable that makes reads return what is written but not committed (the
/// fault-injection harness's dirty-read canary; refused by a build without the test-only
/// feature).
pub const READ_UNCOMMITTED_ENV: &str = "WEFT_CANARY_READ_UNCOMMITTED";

#[cfg(feature = "sync-journal")]
static READ_UNCOMMITTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the dirty-read canary is on: reads go past the high watermark to the log's end
/// (never, without the test-only feature).
pub fn read_uncommitted() -> bool {
    #[cfg(feature = "sync-journal")]
    {
        READ_UNCOMMITTED.load(std::sync::atomic::Ordering::Relaxed)
    }
    #[cfg(not(feature = "sync-journal"))]
    {
        false
    }
}

/// The environment variable that stalls every sync of a segment data file by this many
/// milliseconds (a slow or hung disk), for tests of backpressure.
pub const DELAY_ENV: &str = "WEFT_SYNC_DELAY_MS";

#[cfg(feature = "sync-journal")]
static LISTENER: std::sync::OnceLock<Arc<dyn SyncListener>> = std::sync::OnceLock::new();

/// The listener every partition log reports its syncs to (None unless installed).
pub fn listener() -> Option<Arc<dyn SyncListener>> {
    #[cfg(feature = "sync-journal")]
    {
        LISTENER.get().cloned()
    }
    #[cfg(not(feature = "sync-journal"))]
    {
        None
    }
}

/// Installs the journal named by `WEFT_SYNC_JOURNAL`, if set. Refuses when this build has no
/// sync journal, so a harness never believes it is recording when it is not.
pub fn install_from_env() -> Result<(), String> {
    if std::env::var_os(SKIP_CRC_ENV).is_some_and(|v| v == "1") {
        #[cfg(feature = "sync-journal")]
        {
            weft_storage::canary::skip_batch_crc();
            // Before logging is set up: straight to stderr (the broker's log file in tests).
            eprintln!(
                "weft-broker: {SKIP_CRC_ENV}=1: batch CRC checks are OFF; damaged bytes reach clients (a canary)"
            );
        }
        #[cfg(not(feature = "sync-journal"))]
        return Err(format!(
            "{SKIP_CRC_ENV} needs a test-only build of the broker (feature sync-journal)"
        ));
    }
    if std::env::var_os(READ_UNCOMMITTED_ENV).is_some_and(|v| v == "1") {
        #[cfg(feature = "sync-journal")]
        {
            READ_UNCOMMITTED.store(true, std::sync::atomic::Ordering::Relaxed);
            eprintln!(
                "weft-broker: {READ_UNCOMMITTED_ENV}=1: reads go past the commit index (a canary)"
            );
        }
        #[cfg(not(feature = "sync-journal"))]
        return Err(format!(
            "{READ_UNCOMMITTED_ENV} needs a test-only build of the broker (feature sync-journal)"
        ));
    }
    let path = std::env::var_os(ENV);
    let delay = std::env::var_os(DELAY_ENV);
    if path.is_none() && delay.is_none() {
        return Ok(());
    }
    #[cfg(feature = "sync-journal")]
    {
        let file = match &path {
            Some(path) => Some(std::sync::Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("cannot open {ENV} {}: {e}", path.to_string_lossy()))?,
            )),
            None => None,
        };
        let delay = match delay {
            Some(ms) => Some(std::time::Duration::from_millis(
                ms.to_string_lossy()
                    .parse()
                    .map_err(|_| format!("{DELAY_ENV} must be a number of milliseconds"))?,
            )),
            None => None,
        };
        let journal: Arc<dyn SyncListener> = Arc::new(Journal { file, delay });
        LISTENER
            .set(journal)
            .map_err(|_| "the sync journal is already installed".to_string())
    }
    #[cfg(not(feature = "sync-journal"))]
    {
        let _ = (path, delay);
        Err(format!(
            "{ENV} or {DELAY_ENV} is set, but this weft-broker was built without the \
             `sync-journal` feature"
        ))
    }
}

#[cfg(feature = "sync-journal")]
#[derive(Debug)]
struct Journal {
    file: Option<std::sync::Mutex<std::fs::File>>,
    delay: Option<std::time::Duration>,
}

#[cfg(feature = "sync-journal")]
impl Journal {
    fn record(&self, kind: char, path: &std::path::Path, len: u64) {
        use std::io::Write;
        if let Some(delay) = self.delay
            && kind == 'S'
            && path.extension().is_some_and(|e| e == "log")
        {
            // Called right after the sync returned and before anything depends on it: the
            // sync, as the broker sees it, takes this much longer.
            std::thread::sleep(delay);
        }
        let Some(file) = &self.file else {
            return;
        };
        let line = format!("{kind} {len} {}\n", path.display());
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
        // One write of an O_APPEND file: the line is whole or absent after kill -9. A failure
        // here would make the harness cut more than the broker synced: loud, never silent.
        if let Err(e) = file.write_all(line.as_bytes()) {
            eprintln!("weft-broker: cannot write the sync journal: {e}");
            std::process::abort();
        }
    }
}

#[cfg(feature = "sync-journal")]
impl SyncListener for Journal {
    fn synced(&self, path: &std::path::Path, len: u64) {
        self.record('S', path, len);
    }

    fn replaced(&self, path: &std::path::Path, len: u64) {
        self.record('R', path, len);
    }
}
