//! Objects as files under a folder (`O_DIRECT` block writes where the filesystem takes them).

use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{ObjectSink, ObjectWriter, check_key};
use crate::error::{Error, Result};
// Local folder

/// Objects as files under a folder (the CLI's default `./pgshift-data/stage`).
#[derive(Debug, Clone)]
pub struct LocalSink {
    root: PathBuf,
}

impl LocalSink {
    pub fn new(root: impl Into<PathBuf>) -> LocalSink {
        LocalSink { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    path.with_file_name(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ))
}

/// Whether a temporary file was left by a writer that is gone: its process (named in the file)
/// no longer runs; an older name without a pid, once it is an hour old.
fn left_by_dead_writer(name: &str, age: std::time::Duration) -> bool {
    let Some(rest) = name.rsplit_once(".tmp-").map(|(_, r)| r) else {
        return false;
    };
    match rest
        .split_once('-')
        .and_then(|(pid, _)| pid.parse::<u32>().ok())
    {
        Some(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        None => age > std::time::Duration::from_secs(3600),
    }
}

async fn ensure_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
    }
    Ok(())
}

/// Alignment (and size granularity) of direct writes: the largest logical block size in use.
const DIRECT_ALIGN: usize = 4096;
/// Bytes a local writer hands to its blocking write at a time (a multiple of [`DIRECT_ALIGN`]).
const LOCAL_BLOCK: usize = 1 << 20;

/// A fixed buffer whose window starts at a [`DIRECT_ALIGN`] boundary (over-allocated and
/// offset, so no unsafe code; the vector never grows, so the window never moves).
struct Block {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Block {
    fn new() -> Block {
        let raw = vec![0u8; LOCAL_BLOCK + DIRECT_ALIGN];
        // An offset that cannot be computed (never for u8 at run time) leaves the window
        // unaligned: the direct write then fails with EINVAL and the file falls back.
        let off = match raw.as_ptr().align_offset(DIRECT_ALIGN) {
            o if o < DIRECT_ALIGN => o,
            _ => 0,
        };
        Block { raw, off, len: 0 }
    }

    /// A placeholder without memory (for a writer whose last block was taken).
    fn empty() -> Block {
        Block {
            raw: Vec::new(),
            off: 0,
            len: 0,
        }
    }

    /// Copies as much of `data` as fits; returns how much.
    fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(LOCAL_BLOCK - self.len);
        let at = self.off + self.len;
        self.raw[at..at + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    fn is_full(&self) -> bool {
        self.len == LOCAL_BLOCK
    }

    fn filled(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    /// The filled bytes zero-padded to the alignment (the last write of a direct file; the
    /// file is cut back to its real length afterwards).
    fn padded(&mut self) -> &[u8] {
        let end = self.len.next_multiple_of(DIRECT_ALIGN);
        self.raw[self.off + self.len..self.off + end].fill(0);
        &self.raw[self.off..self.off + end]
    }
}

/// The file under a [`LocalWriter`], used from blocking threads only.
///
/// On Linux it is opened with `O_DIRECT`: staged data goes from the aligned buffer to the
/// device without being copied into (and first allocating) page cache, which on the
/// machines measured cost as much CPU as the whole COPY it stages. Filesystems without
/// direct I/O (tmpfs, some network filesystems) refuse the flag at open or the first write;
/// the file then continues through the page cache from where it was.
struct BlockFile {
    file: std::fs::File,
    path: PathBuf,
    direct: bool,
    /// Bytes durably handed to the file so far (always whole blocks before the last).
    written: u64,
}

impl BlockFile {
    fn create(path: &Path) -> std::io::Result<BlockFile> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
            {
                Ok(file) => {
                    return Ok(BlockFile {
                        file,
                        path: path.to_owned(),
                        direct: true,
                        written: 0,
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(BlockFile {
            file,
            path: path.to_owned(),
            direct: false,
            written: 0,
        })
    }

    /// Leaves direct I/O: reopens through the page cache at the last whole write (a
    /// refused or partial direct write is simply written again).
    fn fall_back(&mut self) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::OpenOptions::new().write(true).open(&self.path)?;
        file.seek(SeekFrom::Start(self.written))?;
        self.file = file;
        self.direct = false;
        Ok(())
    }

    fn write_block(&mut self, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        if self.direct {
            match self.file.write_all(data) {
                Ok(()) => {
                    self.written += data.len() as u64;
                    return Ok(());
                }
                Err(e) if is_direct_refusal(&e) => self.fall_back()?,
                Err(e) => return Err(e),
            }
        }
        self.file.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Writes the last (partial) block, trims the padding, syncs.
    fn finish(&mut self, block: &mut Block) -> std::io::Result<()> {
        use std::io::Write;
        let len = block.len as u64;
        if self.direct && len > 0 {
            match self.file.write_all(block.padded()) {
                Ok(()) => {
                    self.file.set_len(self.written + len)?;
                    self.written += len;
                }
                Err(e) if is_direct_refusal(&e) => {
                    self.fall_back()?;
                    self.file.write_all(block.filled())?;
                    self.written += len;
                }
                Err(e) => return Err(e),
            }
        } else if len > 0 {
            self.file.write_all(block.filled())?;
            self.written += len;
        }
        self.file.sync_all()
    }
}

fn is_direct_refusal(e: &std::io::Error) -> bool {
    #[cfg(target_os = "linux")]
    {
        e.raw_os_error() == Some(libc::EINVAL)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = e;
        false
    }
}

type InFlight = tokio::task::JoinHandle<std::io::Result<(BlockFile, Block)>>;

/// A file being written beside its final name: blocks of `LOCAL_BLOCK` (1 MiB) written on a
/// blocking thread while the next block fills (two buffers per writer).
pub struct LocalWriter {
    file: Option<BlockFile>,
    inflight: Option<InFlight>,
    block: Block,
    spare: Option<Block>,
    tmp: PathBuf,
    path: PathBuf,
    bytes: u64,
}

impl LocalWriter {
    /// Waits for the block being written; returns the file.
    async fn settle(&mut self) -> Result<BlockFile> {
        if let Some(h) = self.inflight.take() {
            let (file, mut done) = h
                .await
                .map_err(|e| Error::io(format!("writing {}", self.tmp.display()), e.into()))?
                .map_err(|e| Error::io(format!("writing {}", self.tmp.display()), e))?;
            done.len = 0;
            self.spare = Some(done);
            self.file = Some(file);
        }
        self.file.take().ok_or_else(|| {
            Error::io(
                format!("writing {}", self.tmp.display()),
                std::io::Error::other("an earlier write failed"),
            )
        })
    }

    async fn write_full_block(&mut self) -> Result<()> {
        let mut file = self.settle().await?;
        let next = self.spare.take().unwrap_or_else(Block::new);
        let full = std::mem::replace(&mut self.block, next);
        self.inflight = Some(tokio::task::spawn_blocking(move || {
            file.write_block(full.filled())?;
            Ok((file, full))
        }));
        Ok(())
    }

    /// Whether the file is written with direct I/O (for tests and diagnostics).
    pub async fn is_direct(&mut self) -> Result<bool> {
        let file = self.settle().await?;
        let direct = file.direct;
        self.file = Some(file);
        Ok(direct)
    }
}

impl ObjectWriter for LocalWriter {
    async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.bytes += data.len() as u64;
        let mut rest = data;
        while !rest.is_empty() {
            let n = self.block.push(rest);
            rest = &rest[n..];
            if self.block.is_full() {
                self.write_full_block().await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<u64> {
        let mut file = self.settle().await?;
        let mut last = std::mem::replace(&mut self.block, Block::empty());
        let (tmp, path) = (self.tmp.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            file.finish(&mut last)
                .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
            drop(file);
            std::fs::rename(&tmp, &path)
                .map_err(|e| Error::io(format!("renaming into {}", path.display()), e))
        })
        .await
        .map_err(|e| Error::io(format!("writing {}", self.tmp.display()), e.into()))??;
        Ok(self.bytes)
    }

    async fn abort(mut self) {
        if let Some(h) = self.inflight.take() {
            let _ = h.await;
        }
        drop(self.file.take());
        let _ = tokio::fs::remove_file(&self.tmp).await;
    }
}

impl ObjectSink for LocalSink {
    type Writer = LocalWriter;

    async fn writer(&self, key: &str) -> Result<LocalWriter> {
        let path = self.path(key)?;
        ensure_parent(&path).await?;
        let tmp = tmp_path(&path);
        let open = tmp.clone();
        let file = tokio::task::spawn_blocking(move || BlockFile::create(&open))
            .await
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e.into()))?
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        Ok(LocalWriter {
            file: Some(file),
            inflight: None,
            block: Block::new(),
            spare: None,
            tmp,
            path,
            bytes: 0,
        })
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        let mut w = self.writer(key).await?;
        w.write(&body).await?;
        w.finish().await.map(|_| ())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let path = self.path(key)?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    async fn reader(&self, key: &str) -> Result<Option<super::ObjectReader>> {
        use tokio::io::AsyncReadExt;
        let path = self.path(key)?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let stream =
            futures_util::stream::try_unfold((file, path), |(mut file, path)| async move {
                let mut buf = vec![0u8; super::READ_PIECE];
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                if n == 0 {
                    return Ok(None);
                }
                buf.truncate(n);
                Ok(Some((Bytes::from(buf), (file, path))))
            });
        Ok(Some(super::ObjectReader::new(stream)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        // Walk from the deepest folder the prefix names.
        let dir_part = prefix.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir_part)
        };
        let mut out = Vec::new();
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
            };
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
            {
                let path = entry.path();
                let ft = entry
                    .file_type()
                    .await
                    .map_err(|e| Error::io(format!("listing {}", path.display()), e))?;
                if ft.is_dir() {
                    stack.push(path);
                    continue;
                }
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue; // a write in progress
                }
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                if key.starts_with(prefix) {
                    out.push(key);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("deleting {}", path.display()), e)),
        }
    }

    async fn sweep(&self) -> Result<u64> {
        let mut removed = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(mut entries) = tokio::fs::read_dir(&dir).await else {
                continue;
            };
            while let Ok(Some(entry)) = entries.next_entry().await {
                let path = entry.path();
                let Ok(meta) = entry.metadata().await else {
                    continue;
                };
                if meta.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .unwrap_or_default();
                if name.starts_with('.')
                    && left_by_dead_writer(&name, age)
                    && tokio::fs::remove_file(&path).await.is_ok()
                {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            tracing::info!(folder = %self.root.display(), removed, "removed temporary files of killed writers");
        }
        Ok(removed)
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that show a misplaced or repeated block (not a repeating short pattern).
    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect()
    }

    async fn round_trip(root: &Path, len: usize, piece: usize) -> bool {
        let sink = LocalSink::new(root);
        let data = pattern(len);
        let mut w = sink.writer("t/LOAD00000001.csv").await.unwrap();
        for p in data.chunks(piece) {
            w.write(p).await.unwrap();
        }
        let direct = w.is_direct().await.unwrap();
        assert_eq!(w.finish().await.unwrap(), len as u64);
        let back = std::fs::read(root.join("t/LOAD00000001.csv")).unwrap();
        assert_eq!(back.len(), len, "length under {}", root.display());
        assert!(back == data, "content under {}", root.display());
        direct
    }

    #[tokio::test]
    async fn local_writer_round_trips_across_blocks_and_tails() {
        let dir =
            std::env::temp_dir().join(format!("pgshift-direct-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        // Whether this filesystem takes direct I/O at all: then the writer must have used it.
        let supports_direct = direct_open_works(&dir);
        // Whole blocks, a partial last block, less than one alignment unit, empty.
        for (len, piece) in [
            (3 * LOCAL_BLOCK + 17, 7919),
            (2 * LOCAL_BLOCK, LOCAL_BLOCK),
            (DIRECT_ALIGN - 1, 100),
            (0, 1),
        ] {
            let direct = round_trip(&dir, len, piece).await;
            assert_eq!(
                direct,
                supports_direct,
                "{len} bytes under {}: direct I/O used where the filesystem takes it",
                dir.display()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        // tmpfs: direct I/O refused (or, on newer kernels, accepted); the bytes are the same.
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let dir = shm.join(format!("pgshift-direct-{}", uuid::Uuid::new_v4().simple()));
            round_trip(&dir, LOCAL_BLOCK + 5, 4096).await;
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// Opens and writes one aligned block with `O_DIRECT` by hand (Linux; false elsewhere).
    fn direct_open_works(dir: &Path) -> bool {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::OpenOptionsExt;
            let path = dir.join("probe");
            let ok = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .and_then(|mut f| {
                    let mut b = Block::new();
                    b.push(&[1u8; DIRECT_ALIGN]);
                    std::io::Write::write_all(&mut f, b.filled())
                })
                .is_ok();
            let _ = std::fs::remove_file(&path);
            ok
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = dir;
            false
        }
    }

    #[test]
    fn block_file_falls_back_at_the_last_whole_block() {
        let dir = std::env::temp_dir().join(format!(
            "pgshift-fallback-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let data = pattern(2 * LOCAL_BLOCK + 123);
        let mut f = BlockFile::create(&path).unwrap();
        let mut b = Block::new();
        assert_eq!(b.push(&data[..LOCAL_BLOCK]), LOCAL_BLOCK);
        f.write_block(b.filled()).unwrap();
        // As if the next direct write had been refused after writing part of it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut raw| std::io::Write::write_all(&mut raw, &[0xEE; 999]))
            .unwrap();
        f.fall_back().unwrap();
        assert!(!f.direct);
        let mut b = Block::new();
        b.push(&data[LOCAL_BLOCK..2 * LOCAL_BLOCK]);
        f.write_block(b.filled()).unwrap();
        let mut last = Block::new();
        last.push(&data[2 * LOCAL_BLOCK..]);
        f.finish(&mut last).unwrap();
        assert!(std::fs::read(&path).unwrap() == data);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn local_sink_writes_atomically_and_lists() {
        let dir =
            std::env::temp_dir().join(format!("pgshift-stage-{}", uuid::Uuid::new_v4().simple()));
        let sink = LocalSink::new(&dir);
        let mut w = sink.writer("s/t/cdc/01.csv").await.unwrap();
        w.write(b"hello").await.unwrap();
        assert!(
            sink.list("s/").await.unwrap().is_empty(),
            "invisible before finish"
        );
        assert_eq!(w.finish().await.unwrap(), 5);
        let w = sink.writer("s/t/cdc/02.csv").await.unwrap();
        w.abort().await;
        sink.put("_manifests/cdc/a.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        assert_eq!(
            sink.list("s/t/").await.unwrap(),
            vec!["s/t/cdc/01.csv".to_owned()]
        );
        assert_eq!(sink.list("").await.unwrap().len(), 2);
        assert_eq!(
            sink.get("s/t/cdc/01.csv").await.unwrap().unwrap(),
            Bytes::from_static(b"hello")
        );
        assert!(sink.get("nope").await.unwrap().is_none());
        sink.delete("s/t/cdc/01.csv").await.unwrap();
        sink.delete("s/t/cdc/01.csv").await.unwrap();
        assert_eq!(sink.list("s/").await.unwrap().len(), 0);
        let _ = std::fs::remove_dir_all(dir);
    }
}
