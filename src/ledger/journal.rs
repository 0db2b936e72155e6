//! The embedded ledger's journal: a ring of records in a file mapped into memory. A request's
//! record is safe from a killed process once its bytes are stored in the mapping (they are in
//! the kernel's page cache, which outlives the process), so the response's last bytes wait for
//! no thread, no lock and no system call. The ledger thread loads the journal into SQLite behind
//! the requests, in batches, and stores how far it loaded in the same transaction: a record is
//! loaded once, and a start after a crash loads exactly what the last run had not.
//!
//! ```text
//!  file: | header page: magic, ring size, file id, loaded (a hint) | ring ......................... |
//!  ring positions are logical (they only grow); a record at position p sits at p % size:
//!  | stamp = p + 1 | len | kind | check | payload, padded to 8 | next record ...
//!    ▲ stored last (release): the record is whole once its stamp reads p + 1
//! ```
//!
//! Writers reserve with one compare-and-swap on the cursor; a record never wraps (the rest of
//! the lap is a skip). A writer may not pass `loaded + size`: when the ring is full (SQLite has
//! been failing or is far behind) the record goes by the ledger thread's queue instead, as every
//! record did before there was a journal. The check is a hash of the payload keyed by the file's
//! random id and the position, so that start-up, scanning for whole records after a crash, can
//! tell them from stale or torn bytes and from a tag value shaped like a header.

use super::read::{self, Value};
use super::Record;
use crate::meter::TokenSource;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Ring bytes of a new journal: about 7,000 records of 300 bytes, a third of a second at
/// 20,000 requests a second, and what a long-running process keeps mapped (its pages count in
/// RSS once touched).
pub const RING_BYTES: u64 = 2 << 20;
const HEADER_PAGE: u64 = 4096;
/// Names the payload's encoding too: a change to `encode` must take a new magic, with a reader
/// for the old one (a file with an unknown magic is refused, and the ledger then commits each
/// record instead).
const MAGIC: &[u8; 8] = b"TGJRNL01";
const RECORD_HEAD: u64 = 24;
const KIND_RECORD: u32 = 1;
const KIND_SKIP: u32 = 2;
/// Records larger than a ring's sixteenth take the queue: a lap must hold many.
const MAX_RECORD_SHARE: u64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("journal {0} is not a Tollgate ledger journal (bad header)")]
    NotAJournal(String),
    /// Another process (a second gateway on the same ledger file) has it.
    #[error("journal {0} is in use by another process")]
    Busy(String),
}

/// The mapped journal, shared by every request and the ledger thread.
pub struct Journal {
    map: memmap2::MmapRaw,
    /// Held for the lock (one process per journal), and to write the ring's zeros.
    file: File,
    pub path: PathBuf,
    size: u64,
    pub file_id: u64,
    /// Next free position.
    cursor: AtomicU64,
    /// Loaded into SQLite up to here; writers may not pass `loaded + size`.
    loaded: AtomicU64,
    /// The ledger thread waits for a wake-up (nothing was left to load).
    pub(super) idle: AtomicBool,
    /// False once the file is gone from its path (its bytes would not outlive the process),
    /// or with `store.fsync` (every record then waits for its fsync'd commit).
    usable: AtomicBool,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("cursor", &self.cursor.load(Ordering::Relaxed))
            .field("loaded", &self.loaded.load(Ordering::Relaxed))
            .finish()
    }
}

/// Where the journal of the ledger file `db` lives.
pub fn path_for(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".pending");
    PathBuf::from(name)
}

impl Journal {
    /// Opens (creating if needed) and locks the journal. Its records not yet loaded are not
    /// touched here: see [`Journal::recover`].
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let io = |source| JournalError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(JournalError::Busy(path.display().to_string()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let len = file.metadata().map_err(io)?.len();
        // A file whose making was cut short (killed before its header was written) is new.
        let unwritten = len == HEADER_PAGE + RING_BYTES && {
            let mut magic = [0u8; 8];
            file.read_exact_at(&mut magic, 0).map_err(io)?;
            magic == [0u8; 8]
        };
        let fresh = len == 0 || unwritten;
        if len == 0 {
            file.set_len(HEADER_PAGE + RING_BYTES).map_err(io)?;
        }
        let map = memmap2::MmapRaw::map_raw(&file).map_err(io)?;
        let mut journal = Journal {
            map,
            file,
            path: path.to_path_buf(),
            size: RING_BYTES,
            file_id: 0,
            cursor: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            idle: AtomicBool::new(false),
            usable: AtomicBool::new(true),
        };
        if fresh {
            let mut id = [0u8; 8];
            getrandom::fill(&mut id).map_err(|e| io(std::io::Error::other(e)))?;
            journal.file_id = u64::from_le_bytes(id) | 1;
            journal.put(0, MAGIC);
            journal.put(8, &RING_BYTES.to_le_bytes());
            journal.put(16, &journal.file_id.to_le_bytes());
        } else {
            let bad = || JournalError::NotAJournal(path.display().to_string());
            if len < HEADER_PAGE + 4096 || &journal.get(0, 8)[..] != MAGIC {
                return Err(bad());
            }
            let size = journal.get_u64(8);
            if !size.is_multiple_of(8) || size < 4096 || HEADER_PAGE + size != len {
                return Err(bad());
            }
            journal.size = size;
            journal.file_id = journal.get_u64(16);
        }
        Ok(journal)
    }

    /// Whole records from `from` on (every one the last process stored and SQLite does not
    /// have), in order; afterwards writers start after the last of them. `from` is SQLite's
    /// position when it knows this file, else the header's hint.
    pub fn recover(&self, from: Option<u64>) -> (Vec<Record>, u64) {
        let from = from.unwrap_or_else(|| self.header_loaded().load(Ordering::Acquire));
        let mut found = Vec::new();
        let mut offset = 0;
        while offset + RECORD_HEAD <= self.size {
            if let Some((pos, total)) = self.whole_at(offset) {
                if pos >= from {
                    found.push(pos);
                }
                offset += total;
            } else {
                offset += 8;
            }
        }
        found.sort_unstable();
        let mut records = Vec::with_capacity(found.len());
        let mut end = from;
        for pos in found {
            let (record, total) = self.decode_at(pos);
            records.extend(record);
            end = pos + total;
        }
        self.cursor.store(end, Ordering::Release);
        self.loaded.store(end, Ordering::Release);
        (records, end)
    }

    /// The record whose checked header starts at ring offset `offset`: (position, bytes).
    fn whole_at(&self, offset: u64) -> Option<(u64, u64)> {
        let stamp = self.get_u64(HEADER_PAGE + offset);
        let pos = stamp.checked_sub(1)?;
        let len = u64::from(self.get_u32(HEADER_PAGE + offset + 8));
        let total = padded(RECORD_HEAD + len);
        if pos % self.size != offset
            || self.get_u32(HEADER_PAGE + offset + 12) != KIND_RECORD
            || offset + total > self.size
        {
            return None;
        }
        let payload = self.get(HEADER_PAGE + offset + RECORD_HEAD, len as usize);
        (self.get_u64(HEADER_PAGE + offset + 16) == check(self.file_id, pos, &payload))
            .then_some((pos, total))
    }

    /// Appends a record; false when the ring has no room (or it is too large for it), and
    /// the caller must take the queue. Never blocks.
    pub fn append(&self, encoded: &[u8]) -> bool {
        let total = padded(RECORD_HEAD + encoded.len() as u64);
        if total > self.size / MAX_RECORD_SHARE {
            return false;
        }
        let mut current = self.cursor.load(Ordering::Relaxed);
        let (start, skipped) = loop {
            let room = self.size - current % self.size;
            let start = if room >= total {
                current
            } else {
                current + room
            };
            if start + total - self.loaded.load(Ordering::Acquire) > self.size {
                return false;
            }
            match self.cursor.compare_exchange_weak(
                current,
                start + total,
                // SeqCst: the ledger thread's idle flag and this cursor are a pair (see
                // `Ledger::submit`), each side storing one and then loading the other.
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => break (start, (start != current).then_some((current, room))),
                Err(now) => current = now,
            }
        };
        if let Some((at, room)) = skipped {
            // Under a header's size the loader steps over the lap's end by itself.
            if room >= RECORD_HEAD {
                self.write_head(at, (room - RECORD_HEAD) as u32, KIND_SKIP, 0);
                self.publish(at);
            }
        }
        let offset = HEADER_PAGE + start % self.size;
        self.put(offset + RECORD_HEAD, encoded);
        let check = check(self.file_id, start, encoded);
        self.write_head(start, encoded.len() as u32, KIND_RECORD, check);
        self.publish(start);
        true
    }

    fn write_head(&self, pos: u64, len: u32, kind: u32, check: u64) {
        let offset = HEADER_PAGE + pos % self.size;
        let mut head = [0u8; 16];
        head[..4].copy_from_slice(&len.to_le_bytes());
        head[4..8].copy_from_slice(&kind.to_le_bytes());
        head[8..].copy_from_slice(&check.to_le_bytes());
        self.put(offset + 8, &head);
    }

    fn publish(&self, pos: u64) {
        self.stamp(HEADER_PAGE + pos % self.size)
            .store(pos + 1, Ordering::Release);
    }

    /// Whether the path still names this file: not removed, not replaced by another (which
    /// another process may have made its own). Records stored here would otherwise not be
    /// found by the next start.
    pub fn still_at_path(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(&self.path), self.file.metadata()) {
            (Ok(named), Ok(held)) => named.ino() == held.ino() && named.dev() == held.dev(),
            _ => false,
        }
    }

    pub fn usable(&self) -> bool {
        self.usable.load(Ordering::Relaxed)
    }

    /// New records take the queue from now on.
    pub fn retire(&self) {
        self.usable.store(false, Ordering::Relaxed);
    }

    /// Whether records may be waiting: positions were reserved past what is loaded.
    pub fn pending(&self) -> bool {
        self.cursor.load(Ordering::SeqCst) > self.loaded.load(Ordering::Relaxed)
    }

    /// Where writers have reserved up to: a flush waits until this much is loaded.
    pub fn reserved(&self) -> u64 {
        self.cursor.load(Ordering::Acquire)
    }

    pub fn loaded(&self) -> u64 {
        self.loaded.load(Ordering::Acquire)
    }

    /// Published records from `loaded` on, up to the first one a writer is still storing:
    /// the records and the position after the last.
    pub fn read_ready(&self, out: &mut Vec<Record>) -> u64 {
        let end = self.cursor.load(Ordering::Acquire);
        let mut pos = self.loaded.load(Ordering::Acquire);
        while pos < end {
            let room = self.size - pos % self.size;
            if room < RECORD_HEAD {
                pos += room;
                continue;
            }
            let offset = HEADER_PAGE + pos % self.size;
            if self.stamp(offset).load(Ordering::Acquire) != pos + 1 {
                break;
            }
            if self.get_u32(offset + 12) == KIND_SKIP {
                pos += padded(RECORD_HEAD + u64::from(self.get_u32(offset + 8)));
                continue;
            }
            let (record, total) = self.decode_at(pos);
            out.extend(record);
            pos += total;
        }
        pos
    }

    /// The record at `pos` and its room. Only this process's own encoding is ever published
    /// or checked, so a record that does not decode is a bug: logged and stepped over rather
    /// than stopping every load after it.
    fn decode_at(&self, pos: u64) -> (Option<Record>, u64) {
        let offset = HEADER_PAGE + pos % self.size;
        let len = self.get_u32(offset + 8) as usize;
        let payload = self.get(offset + RECORD_HEAD, len);
        let record = decode(&payload)
            .inspect_err(|e| tracing::error!(error = %e, pos, journal = %self.path.display(), "a journal record does not decode; skipped"))
            .ok();
        (record, padded(RECORD_HEAD + len as u64))
    }

    /// SQLite has everything before `pos`: writers may reuse that room.
    pub fn mark_loaded(&self, pos: u64) {
        self.loaded.store(pos, Ordering::Release);
        self.header_loaded().store(pos, Ordering::Release);
    }

    /// Unmaps the ring's pages that hold only positions in `[from, to)`: their bytes stay in
    /// the file (and the page cache), but no longer count in this process's RSS until a writer
    /// touches them again on the next lap. Returns where the next call should start.
    pub fn release(&self, from: u64, to: u64) -> u64 {
        const PAGE: u64 = 4096;
        let (start, end) = (from.div_ceil(PAGE) * PAGE, to / PAGE * PAGE);
        if end <= start {
            return from;
        }
        // A range longer than the ring is the whole ring; otherwise it may wrap once.
        let len = (end - start).min(self.size);
        let first = start % self.size;
        let ranges = if first + len <= self.size {
            [(first, len), (0, 0)]
        } else {
            [(first, self.size - first), (0, first + len - self.size)]
        };
        for (offset, len) in ranges.into_iter().filter(|&(_, len)| len > 0) {
            self.drop_pages(offset, len);
        }
        end
    }

    /// Writes zeros over the whole ring, once what `recover` found is in SQLite and before any
    /// writer starts: no stamp of an earlier run is left for the ledger thread to mistake for
    /// a new one, and every block of the file is allocated now, so that a store into the
    /// mapping never meets a full disk (which would kill the process with SIGBUS: a full disk
    /// must make the ledger unhealthy, not end the gateway). Then the pages leave RSS.
    pub fn clear_ring(&self) -> std::io::Result<()> {
        let zeros = vec![0u8; 256 << 10];
        let mut offset = 0;
        while offset < self.size {
            let n = (self.size - offset).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], HEADER_PAGE + offset)?;
            offset += n as u64;
        }
        self.drop_pages(0, self.size);
        Ok(())
    }

    fn drop_pages(&self, ring_offset: u64, len: u64) {
        // SAFETY: MADV_DONTNEED on a shared file mapping drops page table entries only: a
        // dirty page stays in the page cache and is written to the file, and a later access
        // maps the same page again, so no byte any writer stored is lost.
        let advised = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                (HEADER_PAGE + ring_offset) as usize,
                len as usize,
            )
        };
        if let Err(e) = advised {
            tracing::debug!(error = %e, "madvise on the journal failed");
        }
    }

    fn header_loaded(&self) -> &AtomicU64 {
        self.stamp(24)
    }

    // The mapping's bytes. Safety, for every accessor below: offsets are checked against the
    // mapping's length; a range is written only by the writer that reserved it (the cursor's
    // compare-and-swap hands each range to one writer) and read by the ledger thread only
    // after its stamp was published with release ordering, or at start before any writer
    // exists; stamps and the loaded hint are 8-aligned (the map is page-aligned, records
    // are padded to 8) and only ever accessed atomically.

    fn stamp(&self, offset: u64) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= self.map.len() as u64);
        // SAFETY: aligned, in bounds, accessed only atomically (see above); the mapping lives
        // as long as `self`.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(offset as usize).cast()) }
    }

    fn put(&self, offset: u64, bytes: &[u8]) {
        assert!(offset + bytes.len() as u64 <= self.map.len() as u64);
        // SAFETY: in bounds; the range is this writer's alone (see above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(offset as usize),
                bytes.len(),
            )
        }
    }

    fn get(&self, offset: u64, len: usize) -> Vec<u8> {
        assert!(offset + len as u64 <= self.map.len() as u64);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds; published or start-up bytes no one writes meanwhile (see above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset as usize),
                out.as_mut_ptr(),
                len,
            )
        }
        out
    }

    fn get_array<const N: usize>(&self, offset: u64) -> [u8; N] {
        assert!(offset + N as u64 <= self.map.len() as u64);
        // SAFETY: as `get`.
        unsafe { std::ptr::read_unaligned(self.map.as_ptr().add(offset as usize).cast()) }
    }

    fn get_u64(&self, offset: u64) -> u64 {
        u64::from_le_bytes(self.get_array(offset))
    }

    fn get_u32(&self, offset: u64) -> u32 {
        u32::from_le_bytes(self.get_array(offset))
    }
}

fn padded(n: u64) -> u64 {
    (n + 7) & !7
}

/// A keyed hash of a record's payload: whole bytes of this file at this position, not stale
/// bytes of an earlier lap, torn bytes, or a header forged inside a tag value.
fn check(file_id: u64, pos: u64, payload: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = file_id ^ pos.wrapping_mul(K) ^ payload.len() as u64;
    let mut chunks = payload.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(31);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    h ^ (h >> 29)
}

const NULL: u8 = 0;
const INT: u8 = 1;
const REAL: u8 = 2;
const TEXT: u8 = 3;

/// A record as its columns, in [`super::sqlite::COLUMNS`]' order, so that [`read::record`]
/// (the reports' own reader) rebuilds it.
pub fn encode(r: &Record, out: &mut Vec<u8>) {
    out.clear();
    let text = |out: &mut Vec<u8>, s: &str| {
        out.push(TEXT);
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    let int = |out: &mut Vec<u8>, n: i64| {
        out.push(INT);
        out.extend_from_slice(&n.to_le_bytes());
    };
    let opt_int = |out: &mut Vec<u8>, n: Option<u64>| match n {
        Some(n) => int(out, n as i64),
        None => out.push(NULL),
    };
    let opt_text = |out: &mut Vec<u8>, s: Option<&str>| match s {
        Some(s) => text(out, s),
        None => out.push(NULL),
    };
    let real = |out: &mut Vec<u8>, x: f64| {
        out.push(REAL);
        out.extend_from_slice(&x.to_le_bytes());
    };
    text(out, &r.id);
    int(out, r.started_at_us);
    int(out, r.ended_at_us);
    text(out, &r.team);
    text(out, &r.key_id);
    text(out, &r.tags);
    text(out, r.endpoint);
    text(out, &r.requested_model);
    opt_text(out, r.backend.as_deref());
    opt_text(out, r.served_model.as_deref());
    opt_int(out, r.prompt_tokens);
    opt_int(out, r.completion_tokens);
    opt_int(out, r.cached_tokens);
    opt_int(out, r.cache_write_tokens);
    opt_int(out, r.reasoning_tokens);
    opt_text(out, r.token_source.map(TokenSource::as_str));
    int(out, r.cost_nusd);
    int(out, i64::from(r.priced));
    int(out, r.egress_bytes as i64);
    text(out, r.status);
    int(out, i64::from(r.http_status));
    int(out, i64::from(r.attempts));
    real(out, r.latency_ms);
    match r.ttft_ms {
        Some(x) => real(out, x),
        None => out.push(NULL),
    }
    int(out, i64::from(r.stream));
    int(out, i64::from(r.resent));
    text(out, &r.replica);
    opt_int(out, r.cache_write_1h_tokens);
}

pub fn decode(mut b: &[u8]) -> Result<Record, read::ReadError> {
    let mut values = Vec::with_capacity(28);
    let bad = |i: usize| read::ReadError::Type(i);
    while let Some((&tag, rest)) = b.split_first() {
        let i = values.len();
        let word = |rest: &[u8]| -> Result<[u8; 8], read::ReadError> {
            rest.get(..8)
                .and_then(|w| w.try_into().ok())
                .ok_or_else(|| bad(i))
        };
        let (value, rest) = match tag {
            NULL => (Value::Null, rest),
            INT => (Value::Int(i64::from_le_bytes(word(rest)?)), &rest[8..]),
            REAL => (Value::Real(f64::from_le_bytes(word(rest)?)), &rest[8..]),
            TEXT => {
                let len = rest
                    .get(..4)
                    .and_then(|w| w.try_into().ok())
                    .map(u32::from_le_bytes)
                    .ok_or_else(|| bad(i))? as usize;
                let s = rest.get(4..4 + len).ok_or_else(|| bad(i))?;
                let s = std::str::from_utf8(s).map_err(|_| bad(i))?;
                (Value::Text(s.to_string()), &rest[4 + len..])
            }
            _ => return Err(bad(i)),
        };
        values.push(value);
        b = rest;
    }
    read::record(&values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::testing::rec;

    fn record(id: &str, cost_nusd: i64) -> Record {
        Record {
            id: id.to_string(),
            cost_nusd,
            ..rec(1_700_000_000_000_000, "team-a", Some("sim"), "m", "{}")
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("tollgate-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A journal opened with nothing to recover, as `Ledger::open` leaves it for writers.
    fn started(path: &Path) -> Journal {
        let j = Journal::open(path).unwrap();
        j.recover(Some(0));
        j
    }

    fn ids(records: &[Record]) -> Vec<String> {
        records.iter().map(|r| r.id.clone()).collect()
    }

    #[test]
    fn a_record_round_trips_through_its_encoding() {
        let mut r = record("r-1", 5);
        r.tags = r#"{"project":"x\"y"}"#.into();
        r.ttft_ms = Some(12.5);
        r.cache_write_1h_tokens = Some(7);
        r.backend = None;
        let mut buf = Vec::new();
        encode(&r, &mut buf);
        assert_eq!(format!("{:?}", decode(&buf).unwrap()), format!("{r:?}"));
        for cut in 0..buf.len() {
            assert!(
                decode(&buf[..cut]).is_err(),
                "a record cut at {cut} bytes decoded"
            );
        }
    }

    /// What a killed process stored is found again, in order, and nothing twice: records
    /// past what SQLite loaded, across the ring's end, with a record whose writer died before
    /// publishing it in between.
    #[test]
    fn a_reopened_journal_recovers_exactly_what_was_not_loaded() {
        let d = dir("recover");
        let path = d.join("ledger.db.pending");
        let mut buf = Vec::new();
        let (loaded_at, written) = {
            let j = started(&path);
            let mut n = 0;
            // Fill most of a lap, load it, then go round the end.
            while j.reserved() < RING_BYTES - 4096 {
                encode(&record(&format!("a{n}"), 1), &mut buf);
                assert!(j.append(&buf));
                n += 1;
            }
            let mut out = Vec::new();
            let upto = j.read_ready(&mut out);
            assert_eq!(out.len(), n);
            j.mark_loaded(upto);
            let mut written = Vec::new();
            for k in 0..100 {
                encode(&record(&format!("b{k}"), 1), &mut buf);
                assert!(j.append(&buf));
                written.push(format!("b{k}"));
            }
            // A writer that reserved but died before its stamp: stale bytes, never published.
            let pos = j.cursor.fetch_add(64, Ordering::AcqRel);
            j.put(HEADER_PAGE + pos % j.size, &[0xAB; 64]);
            encode(&record("after-hole", 1), &mut buf);
            assert!(j.append(&buf));
            written.push("after-hole".into());
            (upto, written)
        };
        let j = Journal::open(&path).unwrap();
        let (records, end) = j.recover(Some(loaded_at));
        assert_eq!(ids(&records), written);
        assert!(end > RING_BYTES, "the records went round the ring's end");
        // The header's hint (when SQLite does not know this file) gives the same answer.
        let (again, _) = j.recover(None);
        assert_eq!(ids(&again), written);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Pages let go of (out of RSS) keep what was stored in them.
    #[test]
    fn released_pages_keep_their_records() {
        let d = dir("release");
        let path = d.join("j.pending");
        let mut buf = Vec::new();
        {
            let j = started(&path);
            for n in 0..2000 {
                encode(&record(&format!("r{n}"), n), &mut buf);
                assert!(j.append(&buf));
            }
            assert_eq!(j.release(0, j.reserved()) % 4096, 0);
            let mut out = Vec::new();
            j.read_ready(&mut out);
            assert_eq!(out.len(), 2000);
            assert_eq!(out[1999].id, "r1999");
        }
        let j = Journal::open(&path).unwrap();
        let (records, _) = j.recover(Some(0));
        assert_eq!(records.len(), 2000);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A kill between a lap's skip marker and the record after it, then a restart: the
    /// cleared ring leaves no stale stamp, so the next records are all read back.
    #[test]
    fn a_skip_left_by_a_killed_process_does_not_hide_later_records() {
        let d = dir("skip");
        let path = d.join("j.pending");
        let mut buf = Vec::new();
        let from = {
            let j = started(&path);
            encode(&record("filler", 1), &mut buf);
            while j.reserved() + 2 * buf.len() as u64 + 64 < RING_BYTES {
                assert!(j.append(&buf));
            }
            let mut out = Vec::new();
            let upto = j.read_ready(&mut out);
            j.mark_loaded(upto);
            // What `append` does when a record does not fit the lap, cut after the skip.
            let at = j.reserved();
            let room = RING_BYTES - at % RING_BYTES;
            j.cursor.store(at + room + 4096, Ordering::SeqCst);
            j.write_head(at, (room - RECORD_HEAD) as u32, KIND_SKIP, 0);
            j.publish(at);
            upto
        };
        let j = Journal::open(&path).unwrap();
        let (records, end) = j.recover(Some(from));
        assert!(records.is_empty());
        j.mark_loaded(end);
        j.clear_ring().unwrap();
        let mut written = Vec::new();
        for n in 0..50 {
            encode(&record(&format!("n{n}"), 1), &mut buf);
            assert!(j.append(&buf));
            written.push(format!("n{n}"));
        }
        let mut out = Vec::new();
        let upto = j.read_ready(&mut out);
        assert_eq!(ids(&out), written);
        assert_eq!(upto, j.reserved());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Killed between making the file and writing its header: the next start makes it anew.
    #[test]
    fn a_journal_whose_header_was_never_written_is_made_anew() {
        let d = dir("unwritten");
        let path = d.join("j.pending");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(HEADER_PAGE + RING_BYTES).unwrap();
        drop(f);
        let j = Journal::open(&path).unwrap();
        assert_ne!(j.file_id, 0);
        j.recover(Some(0));
        let mut buf = Vec::new();
        encode(&record("x", 1), &mut buf);
        assert!(j.append(&buf));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_full_ring_refuses_and_takes_records_again_once_loaded() {
        let d = dir("full");
        let j = started(&d.join("j.pending"));
        let mut buf = Vec::new();
        encode(&record("x", 1), &mut buf);
        let mut n = 0;
        while j.append(&buf) {
            n += 1;
        }
        assert!(n > 1000, "{n} records fit");
        let mut out = Vec::new();
        let upto = j.read_ready(&mut out);
        assert_eq!(out.len(), n);
        j.mark_loaded(upto);
        assert!(j.append(&buf));
        let large = vec![b'x'; (RING_BYTES / MAX_RECORD_SHARE) as usize];
        assert!(!j.append(&large), "too large for the ring");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Writers on several threads at once: every record is read back once, whole.
    #[test]
    fn concurrent_writers_lose_and_tear_nothing() {
        let d = dir("threads");
        let j = started(&d.join("j.pending"));
        let mut seen = std::collections::HashSet::new();
        std::thread::scope(|scope| {
            for t in 0..4 {
                let j = &j;
                scope.spawn(move || {
                    let mut buf = Vec::new();
                    for i in 0..5000 {
                        let mut r = record(&format!("t{t}-{i}"), i);
                        r.tags = "x".repeat(i as usize % 300);
                        encode(&r, &mut buf);
                        while !j.append(&buf) {
                            std::thread::yield_now();
                        }
                    }
                });
            }
            let mut out = Vec::new();
            let deadline = crate::clock::now() + std::time::Duration::from_secs(60);
            while seen.len() < 20_000 {
                assert!(
                    crate::clock::now() < deadline,
                    "only {} of 20000 records read back",
                    seen.len()
                );
                out.clear();
                let upto = j.read_ready(&mut out);
                j.mark_loaded(upto);
                for r in &out {
                    assert_eq!(r.tags.len(), r.cost_nusd as usize % 300);
                    assert!(seen.insert(r.id.clone()), "{} twice", r.id);
                }
            }
        });
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_journal_removed_or_replaced_is_noticed() {
        let d = dir("moved");
        let path = d.join("j.pending");
        let j = Journal::open(&path).unwrap();
        assert!(j.still_at_path());
        std::fs::rename(&path, d.join("elsewhere")).unwrap();
        assert!(!j.still_at_path(), "removed");
        std::fs::write(&path, b"another file").unwrap();
        assert!(!j.still_at_path(), "replaced");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_second_process_cannot_take_the_journal_and_garbage_is_refused() {
        let d = dir("lock");
        let path = d.join("j.pending");
        let _held = Journal::open(&path).unwrap();
        assert!(matches!(Journal::open(&path), Err(JournalError::Busy(_))));
        let other = d.join("other.pending");
        std::fs::write(&other, vec![7u8; 16384]).unwrap();
        assert!(matches!(
            Journal::open(&other),
            Err(JournalError::NotAJournal(_))
        ));
        let _ = std::fs::remove_dir_all(&d);
    }
}
