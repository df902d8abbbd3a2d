//! The embedded store's write-ahead log for the hot path.
//!
//! A decision is made in memory, under one lock and so in one serial order, and its
//! effects (absolute values to put: the token's usage, the site's window, the audit
//! record, quota events) are appended here as one entry. The caller is answered once
//! the entry is on disk: one `write` and one `fdatasync` for all the entries gathered
//! while the previous write ran (group commit). The entries' puts reach the database
//! in one durable transaction per checkpoint (every 20 ms, sooner when a log file
//! fills or a reader needs them), instead of a B-tree commit per batch of decisions.
//!
//! Two fixed-size files, used in turn: generation `g` writes file `g % 2` from its
//! start. A checkpoint moves appends to generation `g + 1`, then applies `g`'s puts
//! and records "next generation `g + 1`" in one transaction; after that `g`'s file is
//! free for `g + 2`. On open, the records of every generation not yet applied are
//! replayed in order (puts are absolute values, so replaying twice is harmless); a
//! torn record, or a stale one from an older generation, ends a file.
//!
//! Record: `len u32 | crc32 u32 (of gen and payload) | gen u64 | payload`, little
//! endian. Payload: puts, each `table u8 | if_absent u8 | key len u16 | key |
//! value len u32 | value`.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Result, StoreError};

/// Size of each log file.
pub(super) const FILE_SIZE: u64 = 16 << 20;
/// A generation this long is checkpointed.
const CHECKPOINT_AT: u64 = 8 << 20;
/// Most bytes written in one group; with [`CHECKPOINT_AT`] a group always fits.
const MAX_GROUP: usize = 4 << 20;
/// Largest entry accepted.
const MAX_ENTRY: usize = 1 << 20;
/// The longest a write (each ends with an `fdatasync`) waits after the previous one
/// started; entries that arrive meanwhile share it. Fewer, larger syncs cost far less
/// CPU (each costs the log thread ~65 µs of it on the development VM), and the proxy
/// hides the wait behind the origin's answer.
const MAX_SYNC_INTERVAL: Duration = Duration::from_micros(500);
/// How long the log lets entries gather after a write, per entry that write carried,
/// up to [`MAX_SYNC_INTERVAL`]: under light load groups are small and entries are
/// written almost at once (CPU is spare); under heavy load the wait grows to the cap
/// and each sync carries many entries. An idle log writes at once.
const GATHER_PER_ENTRY: Duration = Duration::from_micros(50);
/// Puts are applied to the database at least this often.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(20);
const HEADER: usize = 16;

/// One entry's puts, encoded.
pub(super) struct Puts(Vec<u8>);

impl Default for Puts {
    /// Room for a decision's usual puts (usage, site window, audit record) at once.
    fn default() -> Self {
        Self(Vec::with_capacity(1024))
    }
}

impl Puts {
    /// Put `value`, as JSON, serialised straight into the entry.
    pub fn put_json(&mut self, table: u8, key: &str, value: &impl serde::Serialize) {
        self.push_json(table, false, key, value);
    }

    pub fn put_json_if_absent(&mut self, table: u8, key: &str, value: &impl serde::Serialize) {
        self.push_json(table, true, key, value);
    }

    #[cfg(test)]
    pub fn put(&mut self, table: u8, key: &str, value: &[u8]) {
        self.push(table, false, key, value);
    }

    #[cfg(test)]
    pub fn put_if_absent(&mut self, table: u8, key: &str, value: &[u8]) {
        self.push(table, true, key, value);
    }

    #[cfg(test)]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn push_key(&mut self, table: u8, if_absent: bool, key: &str) {
        let b = &mut self.0;
        b.push(table);
        b.push(if_absent as u8);
        b.extend_from_slice(&(key.len() as u16).to_le_bytes());
        b.extend_from_slice(key.as_bytes());
    }

    #[cfg(test)]
    fn push(&mut self, table: u8, if_absent: bool, key: &str, value: &[u8]) {
        self.push_key(table, if_absent, key);
        self.0
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.0.extend_from_slice(value);
    }

    fn push_json(&mut self, table: u8, if_absent: bool, key: &str, value: &impl serde::Serialize) {
        self.push_key(table, if_absent, key);
        let at = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        serde_json::to_writer(&mut self.0, value).expect("domain records serialise");
        let len = (self.0.len() - at - 4) as u32;
        self.0[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// One decoded put.
pub(super) struct Put<'a> {
    pub table: u8,
    pub if_absent: bool,
    pub key: &'a str,
    pub value: &'a [u8],
}

/// The puts in concatenated payloads; `Corrupt` if they do not parse.
pub(super) fn decode_puts(mut b: &[u8]) -> Result<Vec<Put<'_>>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
        if b.len() < n {
            return Err(StoreError::Corrupt("truncated log entry".into()));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let flags = take(&mut b, 2)?;
        let key_len = u16::from_le_bytes(take(&mut b, 2)?.try_into().expect("2 bytes"));
        let key = std::str::from_utf8(take(&mut b, key_len as usize)?)
            .map_err(|_| StoreError::Corrupt("log entry key is not UTF-8".into()))?;
        let value_len = u32::from_le_bytes(take(&mut b, 4)?.try_into().expect("4 bytes"));
        let value = take(&mut b, value_len as usize)?;
        out.push(Put {
            table: flags[0],
            if_absent: flags[1] == 1,
            key,
            value,
        });
    }
    Ok(out)
}

fn checksum(gen: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&gen.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn encode_record(out: &mut Vec<u8>, gen: u64, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(gen, payload).to_le_bytes());
    out.extend_from_slice(&gen.to_le_bytes());
    out.extend_from_slice(payload);
}

/// The generation of a file's records, if at least `min_gen`, and their payloads
/// concatenated; scanning stops at the first torn, stale or foreign record.
pub(super) fn scan(file: &[u8], min_gen: u64) -> Option<Generation> {
    let mut at = 0;
    let mut found: Option<Generation> = None;
    while at + HEADER <= file.len() {
        let word = |i: usize| u32::from_le_bytes(file[at + i..at + i + 4].try_into().unwrap());
        let (len, crc) = (word(0) as usize, word(4));
        let gen = u64::from_le_bytes(file[at + 8..at + 16].try_into().unwrap());
        let end = at + HEADER + len;
        if len == 0 || end > file.len() || gen < min_gen {
            break;
        }
        let payload = &file[at + HEADER..end];
        if checksum(gen, payload) != crc {
            break;
        }
        match &mut found {
            None => found = Some((gen, payload.to_vec())),
            Some((g, all)) if *g == gen => all.extend_from_slice(payload),
            Some(_) => break,
        }
        at = end;
    }
    found
}

/// A generation not yet applied: its number and its puts.
pub(super) type Generation = (u64, Vec<u8>);

/// The two log files of the database at `db_path`.
pub(super) fn file_paths(db_path: &Path) -> [PathBuf; 2] {
    [
        db_path.with_extension("wal0"),
        db_path.with_extension("wal1"),
    ]
}

/// Open (or create, sized) both files; return them with their unapplied generations
/// (at least `next_gen`), in generation order.
pub(super) fn open_files(db_path: &Path, next_gen: u64) -> Result<([File; 2], Vec<Generation>)> {
    let io = |e: std::io::Error| StoreError::Unavailable(format!("write-ahead log: {e}"));
    let mut files = Vec::new();
    let mut unapplied = Vec::new();
    for path in file_paths(db_path) {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < FILE_SIZE {
            file.set_len(FILE_SIZE).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        let mut bytes = vec![0; len.min(FILE_SIZE) as usize];
        file.read_exact_at(&mut bytes, 0).map_err(io)?;
        unapplied.extend(scan(&bytes, next_gen));
        files.push(file);
    }
    if let Some(dir) = db_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The files' directory entries must survive a crash too.
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    unapplied.sort_by_key(|(gen, _)| *gen);
    let files: [File; 2] = files.try_into().expect("two files");
    Ok((files, unapplied))
}

/// A checkpoint to run in the database's writer: apply `puts` (generation `gen`)
/// and record `gen + 1` as the next generation, durably. `done` must be called with
/// the commit's outcome.
pub(super) struct Checkpoint {
    pub gen: u64,
    pub puts: Vec<u8>,
    pub done: Box<dyn FnOnce(Result<()>) + Send>,
}

/// Hands a checkpoint to the database's writer.
pub(super) type Checkpointer = Box<dyn Fn(Checkpoint) -> Result<()> + Send>;

type Ack = oneshot::Sender<Result<()>>;

enum Item {
    Entry {
        payload: Vec<u8>,
        seq: u64,
        ack: Ack,
    },
    /// Answer once everything before it is applied to the database.
    Sync(Ack),
}

#[derive(Default)]
struct Queue {
    items: Vec<Item>,
    waiting: bool,
    stop: bool,
    failed: Option<String>,
}

/// Progress of checkpoints: the last generation applied, or why one failed.
struct Applied {
    gen: Mutex<std::result::Result<u64, String>>,
    changed: Condvar,
    /// Highest entry sequence number that is in the database.
    seq: AtomicU64,
}

/// The log: entries go in with [`Wal::append`]; one thread writes them.
pub(super) struct Wal {
    queue: Mutex<Queue>,
    wake: Condvar,
    applied: Arc<Applied>,
}

impl Wal {
    /// Start the log's thread, appending generation `gen` to its file.
    pub fn start(
        files: [File; 2],
        gen: u64,
        checkpointer: Checkpointer,
    ) -> std::io::Result<(Arc<Self>, std::thread::JoinHandle<()>)> {
        let wal = Arc::new(Self {
            queue: Mutex::default(),
            wake: Condvar::new(),
            applied: Arc::new(Applied {
                gen: Mutex::new(Ok(gen - 1)),
                changed: Condvar::new(),
                seq: AtomicU64::new(0),
            }),
        });
        let mut writer = Writer {
            wal: wal.clone(),
            files,
            gen,
            offset: 0,
            unapplied: Vec::new(),
            unapplied_seq: 0,
            last_checkpoint: Instant::now(),
            checkpointer,
        };
        let thread = std::thread::Builder::new()
            .name("payfence-wal".into())
            .spawn(move || writer.run())?;
        Ok((wal, thread))
    }

    fn push(&self, item: Item) -> Result<()> {
        let mut q = self.queue.lock().unwrap();
        if let Some(e) = &q.failed {
            return Err(StoreError::Unavailable(format!("write-ahead log: {e}")));
        }
        q.items.push(item);
        if q.waiting {
            q.waiting = false;
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Queue one entry; the receiver answers once it is on disk. Entries are written
    /// in the order they are appended.
    pub fn append(&self, puts: Puts, seq: u64) -> Result<oneshot::Receiver<Result<()>>> {
        if puts.0.len() > MAX_ENTRY {
            return Err(StoreError::Unavailable("log entry too large".into()));
        }
        let (ack, rx) = oneshot::channel();
        self.push(Item::Entry {
            payload: puts.0,
            seq,
            ack,
        })?;
        Ok(rx)
    }

    /// Resolves once every entry appended before it is in the database.
    pub async fn sync(&self) -> Result<()> {
        let (ack, rx) = oneshot::channel();
        self.push(Item::Sync(ack))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("write-ahead log stopped".into()))?
    }

    /// Highest sequence number whose entry is in the database.
    pub fn applied_seq(&self) -> u64 {
        self.applied.seq.load(Ordering::Acquire)
    }

    /// Refuse entries from now on (fail closed), and say so once. The entries already
    /// acknowledged are on disk, in the log; the database is replayed from it at start.
    fn fail(&self, why: String) {
        let mut q = self.queue.lock().unwrap();
        if q.failed.is_none() {
            tracing::error!(
                error = %why,
                "the store failed: refusing decisions until PayFence is restarted; \
                 fix the cause (e.g. free disk space), then restart: every acknowledged \
                 decision is in the write-ahead log and is replayed at start"
            );
            q.failed = Some(why);
        }
    }

    /// Why the log refuses entries, if it does.
    pub fn failure(&self) -> Option<String> {
        self.queue.lock().unwrap().failed.clone()
    }

    /// Stop the thread (entries already written stay in the files).
    pub fn stop(&self) {
        let mut q = self.queue.lock().unwrap();
        q.stop = true;
        self.wake.notify_one();
    }
}

/// The log thread's state.
struct Writer {
    wal: Arc<Wal>,
    files: [File; 2],
    gen: u64,
    offset: u64,
    /// Payloads of this generation written but not yet applied, and their last seq.
    unapplied: Vec<u8>,
    unapplied_seq: u64,
    last_checkpoint: Instant,
    checkpointer: Checkpointer,
}

impl Writer {
    fn run(&mut self) {
        let mut buf = Vec::with_capacity(MAX_GROUP + MAX_ENTRY);
        let mut last_sync = Instant::now();
        let mut gather = Duration::ZERO;
        loop {
            // Let entries gather until the next write may start (nobody wakes us).
            std::thread::sleep(gather.saturating_sub(last_sync.elapsed()));
            let items = {
                let mut q = self.wal.queue.lock().unwrap();
                while q.items.is_empty() && !q.stop {
                    q.waiting = true;
                    if self.unapplied.is_empty() {
                        q = self.wal.wake.wait(q).unwrap();
                    } else {
                        let left = CHECKPOINT_EVERY.saturating_sub(self.last_checkpoint.elapsed());
                        let (guard, timeout) = self.wal.wake.wait_timeout(q, left).unwrap();
                        q = guard;
                        if timeout.timed_out() {
                            break;
                        }
                    }
                }
                q.waiting = false;
                if q.stop && q.items.is_empty() {
                    return;
                }
                // Take at most MAX_GROUP bytes of entries, in order.
                let mut bytes = 0;
                let n = q
                    .items
                    .iter()
                    .position(|i| {
                        if let Item::Entry { payload, .. } = i {
                            bytes += payload.len() + HEADER;
                        }
                        bytes > MAX_GROUP
                    })
                    .map_or(q.items.len(), |p| p.max(1));
                q.items.drain(..n).collect::<Vec<_>>()
            };

            let mut acks = Vec::new();
            let mut syncs = Vec::new();
            let mut last_seq = self.unapplied_seq;
            // Payloads join `unapplied` now and leave it again if the write fails.
            let kept = self.unapplied.len();
            buf.clear();
            for item in items {
                match item {
                    Item::Entry { payload, seq, ack } => {
                        encode_record(&mut buf, self.gen, &payload);
                        self.unapplied.extend_from_slice(&payload);
                        last_seq = seq;
                        acks.push(ack);
                    }
                    Item::Sync(ack) => syncs.push(ack),
                }
            }
            if !buf.is_empty() {
                last_sync = Instant::now();
                let file = &self.files[(self.gen % 2) as usize];
                let written = file
                    .write_all_at(&buf, self.offset)
                    .and_then(|()| file.sync_data());
                if let Err(e) = written {
                    self.unapplied.truncate(kept);
                    self.wal.fail(format!("writing the log failed: {e}"));
                    for ack in acks.into_iter().chain(syncs) {
                        let _ = ack.send(Err(StoreError::Unavailable(e.to_string())));
                    }
                    continue;
                }
                self.offset += buf.len() as u64;
                self.unapplied_seq = last_seq;
                gather = GATHER_PER_ENTRY
                    .saturating_mul(acks.len().try_into().unwrap_or(u32::MAX))
                    .min(MAX_SYNC_INTERVAL);
                for ack in acks {
                    let _ = ack.send(Ok(()));
                }
            }
            let due =
                !self.unapplied.is_empty() && self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY;
            if !syncs.is_empty() || due || self.offset >= CHECKPOINT_AT {
                self.checkpoint(syncs);
            }
        }
    }

    /// Move appends to the next generation and have the writer apply this one.
    fn checkpoint(&mut self, syncs: Vec<Ack>) {
        self.last_checkpoint = Instant::now();
        let gen = self.gen;
        let next = gen + 1;
        // The next generation's file held generation gen - 1: wait until it is applied.
        let waited = {
            let mut applied = self.wal.applied.gen.lock().unwrap();
            while matches!(*applied, Ok(g) if g + 1 < gen) {
                applied = self.wal.applied.changed.wait(applied).unwrap();
            }
            applied.clone()
        };
        if let Err(e) = waited {
            // Nothing more can be applied: refuse entries rather than lose them.
            self.wal.fail(format!("checkpoint failed: {e}"));
            for ack in syncs {
                let _ = ack.send(Err(StoreError::Unavailable(e.clone())));
            }
            return;
        }
        let wal = self.wal.clone();
        let seq = self.unapplied_seq;
        let checkpoint = Checkpoint {
            gen,
            puts: std::mem::take(&mut self.unapplied),
            done: Box::new(move |result: Result<()>| {
                let applied = &wal.applied;
                match &result {
                    Ok(()) => {
                        *applied.gen.lock().unwrap() = Ok(gen);
                        applied.seq.store(seq, Ordering::Release);
                    }
                    Err(e) => {
                        *applied.gen.lock().unwrap() = Err(e.to_string());
                        wal.fail(format!("applying generation {gen} failed: {e}"));
                    }
                }
                applied.changed.notify_all();
                for ack in syncs {
                    let _ = ack.send(match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(StoreError::Unavailable(e.to_string())),
                    });
                }
            }),
        };
        self.gen = next;
        self.offset = 0;
        if let Err(e) = (self.checkpointer)(checkpoint) {
            // The database is gone: nothing more can be applied, so stop taking entries.
            self.wal.fail(format!("checkpoint: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(gen: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(&mut out, gen, payload);
        out
    }

    #[test]
    fn puts_round_trip() {
        let mut p = Puts::default();
        p.put(2, "site_a/0001/log_x", b"{\"a\":1}");
        p.put_if_absent(3, "k", b"");
        let puts = decode_puts(&p.0).unwrap();
        assert_eq!(puts.len(), 2);
        assert_eq!((puts[0].table, puts[0].if_absent), (2, false));
        assert_eq!(
            (puts[0].key, puts[0].value),
            ("site_a/0001/log_x", &b"{\"a\":1}"[..])
        );
        assert_eq!(
            (puts[1].table, puts[1].if_absent, puts[1].key),
            (3, true, "k")
        );
        assert!(decode_puts(&p.0[..p.0.len() - 1]).is_err());
    }

    #[test]
    fn scan_stops_at_torn_stale_or_foreign_records() {
        let mut file = record(7, b"one");
        file.extend(record(7, b"two"));
        let good = file.len();
        file.extend(record(5, b"stale")); // an older generation's leftovers
        file.resize(4096, 0);
        assert_eq!(scan(&file, 7), Some((7, b"onetwo".to_vec())));
        assert_eq!(scan(&file, 8), None, "already applied");

        let mut torn = file.clone();
        torn[good - 1] ^= 1; // last byte of "two"
        assert_eq!(scan(&torn, 1), Some((7, b"one".to_vec())));

        let mut cut = record(9, b"whole");
        cut.extend(&record(9, b"partial")[..10]);
        assert_eq!(scan(&cut, 1), Some((9, b"whole".to_vec())));

        let mut mixed = record(9, b"a");
        mixed.extend(record(10, b"b"));
        assert_eq!(scan(&mixed, 1), Some((9, b"a".to_vec())));
        assert_eq!(scan(&[0; 64], 1), None);
    }

    fn entry(i: u32) -> Puts {
        let mut p = Puts::default();
        p.put(0, &format!("k{i}"), &i.to_le_bytes());
        p
    }

    fn keys(payload: &[u8]) -> Vec<String> {
        decode_puts(payload)
            .unwrap()
            .iter()
            .map(|p| p.key.to_owned())
            .collect()
    }

    /// Acknowledged entries are on disk before any checkpoint: a crash (here, the
    /// thread stopped with its checkpoints never applied) loses none of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_entries_are_replayed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.redb");
        let (files, unapplied) = open_files(&db, 1).unwrap();
        assert!(unapplied.is_empty());
        // Checkpoints are handed over but never applied, as if the process died.
        let (wal, thread) = Wal::start(files, 1, Box::new(|_c| Ok(()))).unwrap();
        let acks: Vec<_> = (0..500)
            .map(|i| wal.append(entry(i), i as u64 + 1).unwrap())
            .collect();
        for ack in acks {
            ack.await.unwrap().unwrap();
        }
        wal.stop();
        thread.join().unwrap();

        let (_, unapplied) = open_files(&db, 1).unwrap();
        let replayed: Vec<String> = unapplied.iter().flat_map(|(_, p)| keys(p)).collect();
        let expected: Vec<String> = (0..500).map(|i| format!("k{i}")).collect();
        assert_eq!(replayed, expected);
        let gens: Vec<u64> = unapplied.iter().map(|(g, _)| *g).collect();
        assert!(gens.windows(2).all(|w| w[0] < w[1]), "{gens:?}");
    }

    /// A sync waits for a checkpoint; generations it applied are not replayed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn applied_generations_are_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.redb");
        let (files, _) = open_files(&db, 1).unwrap();
        let applied = Arc::new(Mutex::new(Vec::new()));
        let seen = applied.clone();
        let checkpointer: Checkpointer = Box::new(move |c: Checkpoint| {
            seen.lock().unwrap().push((c.gen, keys(&c.puts)));
            (c.done)(Ok(()));
            Ok(())
        });
        let (wal, thread) = Wal::start(files, 1, checkpointer).unwrap();
        for i in 0..3 {
            wal.append(entry(i), i as u64 + 1)
                .unwrap()
                .await
                .unwrap()
                .unwrap();
        }
        wal.sync().await.unwrap();
        assert_eq!(wal.applied_seq(), 3);
        let next_gen = applied.lock().unwrap().last().unwrap().0 + 1;
        let all: Vec<String> = applied
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, k)| k.clone())
            .collect();
        assert_eq!(all, ["k0", "k1", "k2"]);
        wal.append(entry(3), 4).unwrap().await.unwrap().unwrap();
        wal.stop();
        thread.join().unwrap();

        let (_, unapplied) = open_files(&db, next_gen).unwrap();
        let replayed: Vec<String> = unapplied.iter().flat_map(|(_, p)| keys(p)).collect();
        assert_eq!(replayed, ["k3"]);
    }

    /// A failed checkpoint stops the log from taking entries (fail closed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_checkpoint_refuses_further_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (files, _) = open_files(&dir.path().join("db.redb"), 1).unwrap();
        let checkpointer: Checkpointer = Box::new(|c: Checkpoint| {
            (c.done)(Err(StoreError::Unavailable("disk full".into())));
            Ok(())
        });
        let (wal, thread) = Wal::start(files, 1, checkpointer).unwrap();
        wal.append(entry(0), 1).unwrap().await.unwrap().unwrap();
        assert!(wal.sync().await.is_err());
        assert!(wal.failure().is_some());
        assert!(wal.append(entry(1), 2).is_err());
        wal.stop();
        thread.join().unwrap();
    }
}
