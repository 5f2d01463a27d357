//! What a running job has done so far, for a progress display: shared by the full load's
//! workers, apply's load and validate (counters only; the CLI draws them).

/// Progress of a run, shared by its workers: units (chunks, tables) total and done, rows and
/// bytes.
#[derive(Debug, Default)]
pub struct Progress {
    pub rows: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
    pub chunks_done: std::sync::atomic::AtomicU64,
    pub chunks_total: std::sync::atomic::AtomicU64,
}
