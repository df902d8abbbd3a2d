//! The embedded store: one redb database file (ACID, crash-safe, survives restarts)
//! and, for the hot path, a write-ahead log beside it.
//!
//! Decisions (check-and-count) are made in memory under one lock, so they are exact
//! under any concurrency, and each decision's effects are appended to the log
//! (`store::wal`); the caller is answered only once they are on disk. The log is
//! applied to the database by checkpoints, and replayed on open after a crash.
//!
//! Every other write goes through one writer thread that applies queued jobs in a
//! single write transaction and commits durably (group commit). Reads use MVCC read
//! transactions and never wait for the writer; reads of what the log holds (audit
//! records, quota events) first wait for a checkpoint.

use std::collections::HashMap;
use std::ops::Bound::{self, Excluded, Included};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

use super::wal::{self, Checkpoint, Puts, Wal};
use super::*;
use crate::domain::audit_kept_since_ms;
use crate::limits::{self, SecondWindow, SlidingWindow, Verdict};

type Def = TableDefinition<'static, &'static str, &'static [u8]>;
const SITES: Def = TableDefinition::new("sites");
const PLANS: Def = TableDefinition::new("plans"); // site/plan
const TOKENS: Def = TableDefinition::new("tokens"); // site/token
const TOKEN_HASH: Def = TableDefinition::new("token_hash"); // hash -> site/token
const KEYS: Def = TableDefinition::new("keys"); // site/key
const KEY_HASH: Def = TableDefinition::new("key_hash"); // hash -> site/key
const USAGE: Def = TableDefinition::new("usage"); // token -> TokenUsage
const SITE_USAGE: Def = TableDefinition::new("site_usage"); // site -> SecondWindow
const FAILED: Def = TableDefinition::new("failed"); // site/client -> SlidingWindow
const AUDIT: Def = TableDefinition::new("audit"); // site/ts_ms(13)/… -> records (see `audit_records`)
const EVENTS: Def = TableDefinition::new("events"); // site/token/period/kind -> QuotaEvent
const ADMIN: Def = TableDefinition::new("admin"); // ts_ms(13)/id -> AdminEvent
const META: Def = TableDefinition::new("meta"); // "wal_next_gen" -> u64 LE, "indexed" -> version
/// Secondary indexes, keyed by [`index_key`], each entry holding a primary key.
const OWNER_SITES: Def = TableDefinition::new("owner_sites"); // owner/site -> site
const CONSUMER_TOKENS: Def = TableDefinition::new("consumer_tokens"); // consumer/token -> site/token
/// The active tokens of each plan (what a plan's deletion checks).
const PLAN_TOKENS: Def = TableDefinition::new("plan_tokens"); // site/plan/token -> site/token
const INDEXES: [Def; 3] = [OWNER_SITES, CONSUMER_TOKENS, PLAN_TOKENS];
const ALL: [Def; 16] = [
    SITES,
    PLANS,
    TOKENS,
    TOKEN_HASH,
    KEYS,
    KEY_HASH,
    USAGE,
    SITE_USAGE,
    FAILED,
    AUDIT,
    EVENTS,
    ADMIN,
    META,
    OWNER_SITES,
    CONSUMER_TOKENS,
    PLAN_TOKENS,
];
/// Tables the write-ahead log puts to, by their number in a log entry.
const LOGGED: [Def; 4] = [USAGE, SITE_USAGE, AUDIT, EVENTS];
const L_USAGE: u8 = 0;
const L_SITE_USAGE: u8 = 1;
const L_AUDIT: u8 = 2;
const L_EVENTS: u8 = 3;
const NEXT_GEN: &str = "wal_next_gen";
/// Holds [`INDEX_VERSION`] once the secondary indexes cover every record: a
/// database from before an index existed (no version, or an older one) has them all
/// built anew when opened.
const INDEXED: &str = "indexed";
const INDEX_VERSION: &[u8] = &[2];
/// Tokens kept in memory before those already in the database are let go.
const MAX_HOT_TOKENS: usize = 100_000;

/// Records a backup copies in one transaction.
const BACKUP_ROWS: usize = 50_000;

/// Most jobs applied in one transaction.
const MAX_BATCH: usize = 512;

type Completer = Box<dyn FnOnce(Result<()>) + Send>;
type Job = Box<dyn FnOnce(&WriteTransaction) -> (Result<()>, Completer) + Send>;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The database's page cache. Decisions are made from memory (the hot state), so the
/// cache serves checkpoints and dashboard queries; redb's default, 1 GiB, let a
/// long-running local server's resident memory grow towards that.
const CACHE_BYTES: usize = 64 << 20;

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("domain records serialise")
}

fn get<T: DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    k: &str,
) -> Result<Option<T>> {
    match t.get(k).map_err(unavailable)? {
        Some(v) => decode(v.value()).map(Some),
        None => Ok(None),
    }
}

fn get_str(t: &impl ReadableTable<&'static str, &'static [u8]>, k: &str) -> Result<Option<String>> {
    Ok(t.get(k)
        .map_err(unavailable)?
        .map(|v| String::from_utf8_lossy(v.value()).into_owned()))
}

/// All values under `prefix/`.
fn list_prefix<T: DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    prefix: &str,
) -> Result<Vec<T>> {
    list_prefix_after(t, prefix, None, usize::MAX)
}

/// Up to `n` values of the keys `{prefix}/…` in key order, after `{prefix}/{after}`
/// when given.
fn list_prefix_after<T: DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    prefix: &str,
    after: Option<&str>,
    n: usize,
) -> Result<Vec<T>> {
    let (start, end) = prefix_range(prefix, after);
    let range = (start.as_ref().map(String::as_str), Excluded(end.as_str()));
    let mut out = Vec::new();
    for row in t.range::<&str>(range).map_err(unavailable)?.take(n) {
        out.push(decode(row.map_err(unavailable)?.1.value())?);
    }
    Ok(out)
}

/// Where the keys `{prefix}/…` start (after `{prefix}/{after}` when given), and the
/// key they end before.
fn prefix_range(prefix: &str, after: Option<&str>) -> (Bound<String>, String) {
    let start = match after {
        Some(key) => Excluded(format!("{prefix}/{key}")),
        None => Included(format!("{prefix}/")),
    };
    (start, format!("{prefix}0")) // '0' sorts right after '/'
}

/// A secondary index entry's key: the indexed value (an owner's or a consumer's
/// `sub`), led by its length so that no value's entries fall among another's (a
/// `sub` may hold `/`), then the id of the record.
fn index_key(value: &str, id: &str) -> String {
    format!("{}/{id}", index_prefix(value))
}

fn index_prefix(value: &str) -> String {
    format!("{:08x}{value}", value.len())
}

/// Up to `n` records of `primary` that `index` lists under `value`, in id order,
/// after the id `after` when given.
fn list_indexed<T: DeserializeOwned>(
    txn: &redb::ReadTransaction,
    index: Def,
    primary: Def,
    value: &str,
    after: Option<&str>,
    n: usize,
) -> Result<Vec<T>> {
    let index = txn.open_table(index).map_err(unavailable)?;
    let primary = txn.open_table(primary).map_err(unavailable)?;
    let (start, end) = prefix_range(&index_prefix(value), after);
    let range = (start.as_ref().map(String::as_str), Excluded(end.as_str()));
    let mut out = Vec::new();
    for row in index.range::<&str>(range).map_err(unavailable)? {
        if out.len() == n {
            break;
        }
        let key = String::from_utf8_lossy(row.map_err(unavailable)?.1.value()).into_owned();
        out.extend(get(&primary, &key)?);
    }
    Ok(out)
}

/// Keeps a table's secondary index in step with a write, in the write's transaction:
/// called with the record as stored before (if any) and as written (if not removed).
type Reindex<T> = fn(&WriteTransaction, Option<&T>, Option<&T>) -> Result<()>;

fn unindexed<T>(_: &WriteTransaction, _: Option<&T>, _: Option<&T>) -> Result<()> {
    Ok(())
}

/// A site is listed under its owner.
fn index_site(txn: &WriteTransaction, was: Option<&Site>, now: Option<&Site>) -> Result<()> {
    let entry = |s: &Site| Some((index_key(&s.owner, &s.site_id), s.site_id.clone()));
    reindex(txn, OWNER_SITES, was.and_then(entry), now.and_then(entry))
}

/// A token is listed under its consumer, if it has one, and while it is active,
/// under its plan.
fn index_token(txn: &WriteTransaction, was: Option<&Token>, now: Option<&Token>) -> Result<()> {
    let primary = |t: &Token| format!("{}/{}", t.site_id, t.token_id);
    let consumer = |t: &Token| Some((index_key(t.consumer.as_deref()?, &t.token_id), primary(t)));
    let plan = |t: &Token| {
        let key = format!("{}/{}/{}", t.site_id, t.plan_id, t.token_id);
        t.revoked_at.is_none().then(|| (key, primary(t)))
    };
    reindex(
        txn,
        CONSUMER_TOKENS,
        was.and_then(consumer),
        now.and_then(consumer),
    )?;
    reindex(txn, PLAN_TOKENS, was.and_then(plan), now.and_then(plan))
}

/// Replace the index entry `was` with `now` (each an entry key and the primary key
/// it points at).
fn reindex(
    txn: &WriteTransaction,
    def: Def,
    was: Option<(String, String)>,
    now: Option<(String, String)>,
) -> Result<()> {
    if was == now {
        return Ok(());
    }
    let mut t = txn.open_table(def).map_err(unavailable)?;
    if let Some((key, _)) = was {
        t.remove(key.as_str()).map_err(unavailable)?;
    }
    if let Some((key, primary)) = now {
        t.insert(key.as_str(), primary.as_bytes())
            .map_err(unavailable)?;
    }
    Ok(())
}

/// What is wrong with a change from the record as stored before (if any) to the
/// record to write, checked in the write's transaction before it writes anything.
type Refusal<T> = fn(&WriteTransaction, Option<&T>, &T) -> Result<Option<StoreError>>;

fn unrefused<T>(_: &WriteTransaction, _: Option<&T>, _: &T) -> Result<Option<StoreError>> {
    Ok(None)
}

/// An active token may be put on a plan (issued on it or moved to it) only while
/// the plan exists: the plan's deletion sees it in [`PLAN_TOKENS`] or comes first.
fn planless(
    txn: &WriteTransaction,
    was: Option<&Token>,
    now: &Token,
) -> Result<Option<StoreError>> {
    if now.revoked_at.is_some() || was.is_some_and(|w| w.plan_id == now.plan_id) {
        return Ok(None);
    }
    let plans = txn.open_table(PLANS).map_err(unavailable)?;
    let key = format!("{}/{}", now.site_id, now.plan_id);
    let missing = plans.get(key.as_str()).map_err(unavailable)?.is_none();
    Ok(missing.then(|| StoreError::Missing("plan".into())))
}

/// Build the secondary indexes anew from the records, once, for a database written
/// before one of them existed (see [`INDEXED`]).
fn build_indexes(txn: &WriteTransaction) -> Result<()> {
    let mut meta = txn.open_table(META).map_err(unavailable)?;
    if meta
        .get(INDEXED)
        .map_err(unavailable)?
        .map(|v| v.value() == INDEX_VERSION)
        == Some(true)
    {
        return Ok(());
    }
    for def in INDEXES {
        txn.delete_table(def).map_err(unavailable)?;
        txn.open_table(def).map_err(unavailable)?;
    }
    index_all(txn, SITES, index_site)?;
    index_all(txn, TOKENS, index_token)?;
    meta.insert(INDEXED, INDEX_VERSION).map_err(unavailable)?;
    Ok(())
}

fn index_all<T: DeserializeOwned>(
    txn: &WriteTransaction,
    def: Def,
    index: Reindex<T>,
) -> Result<()> {
    for row in txn
        .open_table(def)
        .map_err(unavailable)?
        .iter()
        .map_err(unavailable)?
    {
        let record: T = decode(row.map_err(unavailable)?.1.value())?;
        index(txn, None, Some(&record))?;
    }
    Ok(())
}

/// A record's key: records are ordered (newest first in queries) by it.
fn audit_key(r: &AuditRecord) -> String {
    format!("{}/{:013}/{}", r.site_id, r.ts_ms, r.id)
}

/// Largest timestamp a 13-digit key holds (year 2286); filters are clamped to it.
const MAX_KEY_TS: u64 = 9_999_999_999_999;

/// The timestamp in an audit table key or record key (`site/ts_ms/…`).
fn key_ts(key: &str) -> Result<u64> {
    key.split('/')
        .nth(1)
        .and_then(|ts| ts.parse().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("audit key {key:?}")))
}

/// A checkpoint writes a site's records as blocks, each spanning at most this
/// (in record timestamps), keyed by the newest record's timestamp; queries look
/// this far past their upper bound for blocks holding older records.
const AUDIT_BLOCK_SPAN_MS: u64 = 1_000;
const AUDIT_BLOCK: u8 = 1;

/// The audit table's values are either one record (its JSON; the table key is the
/// record's key) or a block written by a checkpoint: a tag byte, then for each
/// record in key order its key (u16 length, LE) and JSON (u32 length, LE).
/// One B-tree insert per block instead of one per decision.
fn audit_records<'a>(key: &'a str, value: &'a [u8]) -> Result<Vec<(&'a str, &'a [u8])>> {
    let corrupt = || StoreError::Corrupt(format!("audit block {key:?}"));
    match value.first() {
        Some(b'{') => Ok(vec![(key, value)]),
        Some(&AUDIT_BLOCK) => {
            fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
                let (head, rest) = b.split_at_checked(n)?;
                *b = rest;
                Some(head)
            }
            let mut b = &value[1..];
            let mut out = Vec::new();
            while !b.is_empty() {
                let record = (|| {
                    let klen = u16::from_le_bytes(take(&mut b, 2)?.try_into().ok()?);
                    let k = std::str::from_utf8(take(&mut b, klen.into())?).ok()?;
                    let vlen = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?);
                    Some((k, take(&mut b, vlen as usize)?))
                })();
                out.push(record.ok_or_else(corrupt)?);
            }
            Ok(out)
        }
        _ => Err(corrupt()),
    }
}

fn audit_block<'a>(records: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let mut out = vec![AUDIT_BLOCK];
    for (k, v) in records {
        out.extend_from_slice(&(k.len() as u16).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// Write a log generation's audit records (key, JSON) as blocks: per site, in key
/// order, split where a block would span more than [`AUDIT_BLOCK_SPAN_MS`].
fn put_audit_blocks(
    t: &mut redb::Table<&'static str, &'static [u8]>,
    gen: u64,
    mut records: Vec<(&str, &[u8])>,
) -> Result<()> {
    records.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut n = 0;
    let mut rest = records.as_slice();
    while let Some(&(first, _)) = rest.first() {
        let site = first.split('/').next().unwrap_or_default();
        let first_ts = key_ts(first)?;
        let mut len = 1;
        let mut last_ts = first_ts;
        for &(k, _) in &rest[1..] {
            let ts = key_ts(k)?;
            if k.split('/').next() != Some(site)
                || ts.saturating_sub(first_ts) > AUDIT_BLOCK_SPAN_MS
            {
                break;
            }
            last_ts = ts;
            len += 1;
        }
        let (block, tail) = rest.split_at(len);
        let key = format!("{site}/{last_ts:013}/~{gen:016x}.{n}");
        t.insert(key.as_str(), audit_block(block.iter().copied()).as_slice())
            .map_err(unavailable)?;
        n += 1;
        rest = tail;
    }
    Ok(())
}

/// The embedded store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

struct Shared {
    db: Arc<Database>,
    /// `None` only while shutting down.
    jobs: Option<mpsc::SyncSender<Job>>,
    wal: Arc<Wal>,
    hot: Mutex<Hot>,
    threads: Vec<JoinHandle<()>>,
}

/// The counters decisions are made on: loaded from the database on first use, then
/// authoritative (every change goes through the log).
#[derive(Default)]
struct Hot {
    tokens: HashMap<String, HotToken>,
    sites: HashMap<String, SecondWindow>,
    /// Sequence number of the last entry appended to the log.
    seq: u64,
}

struct HotToken {
    usage: TokenUsage,
    revoked: bool,
    /// The last log entry that changed it.
    seq: u64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The log thread first (it hands checkpoints to the writer), then the writer.
        self.wal.stop();
        let mut threads = std::mem::take(&mut self.threads).into_iter();
        if let Some(log) = threads.next() {
            let _ = log.join();
        }
        self.jobs.take();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Create an empty database file at `path`, unless one is there, that only its
/// owner may read or write (mode 0600; redb initializes an empty file).
fn create_private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let created = (std::fs::File::options().write(true).create_new(true))
        .mode(0o600)
        .open(path);
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(unavailable(format!("{}: {e}", path.display()))),
    }
}

/// Open (or create) the database file, telling apart a file another process holds
/// and a damaged one. redb asserts some of its file's invariants when it opens it (a
/// truncated file fails one): that panic is a damaged file too.
fn open_database(path: &Path) -> Result<redb::Database> {
    create_private_file(path)?;
    let opened = std::panic::catch_unwind(|| {
        redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
    });
    let damaged = |why: String| {
        StoreError::Unavailable(format!(
            "{} is damaged ({why}); restore it from a backup or move it away",
            path.display()
        ))
    };
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(StoreError::Unavailable(format!(
            "{} is in use by another process",
            path.display()
        ))),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(why)))) => {
            Err(damaged(why))
        }
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            Err(damaged("not a database file".into()))
        }
        Ok(Err(e)) => Err(StoreError::Unavailable(format!("{}: {e}", path.display()))),
        Err(panic) => Err(damaged(crate::telemetry::panic_message(panic.as_ref()))),
    }
}

impl EmbeddedStore {
    /// Open (or create) the database file at `path`, and its write-ahead log beside
    /// it (`.wal0`, `.wal1`); entries not yet in the database are replayed.
    pub fn open(path: &Path) -> Result<Self> {
        let db = open_database(path)?;
        let txn = db.begin_write().map_err(unavailable)?;
        for def in ALL {
            txn.open_table(def).map_err(unavailable)?;
        }
        build_indexes(&txn)?;
        let next_gen = next_gen(&txn)?;
        let (files, unapplied) = wal::open_files(path, next_gen)?;
        let mut gen = next_gen;
        for (g, puts) in &unapplied {
            apply_logged(&txn, *g, puts)?;
            gen = g + 1;
        }
        set_next_gen(&txn, gen)?;
        txn.commit().map_err(unavailable)?;
        if !unapplied.is_empty() {
            tracing::info!(
                generations = unapplied.len(),
                "replayed the write-ahead log"
            );
        }

        let db = Arc::new(db);
        let (tx, rx) = mpsc::sync_channel::<Job>(16 * MAX_BATCH);
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("payfence-store-writer".into())
            .spawn(move || writer(writer_db, rx))
            .map_err(unavailable)?;
        let jobs = tx.clone();
        let checkpointer: wal::Checkpointer = Box::new(move |c: Checkpoint| {
            jobs.send(checkpoint_job(c))
                .map_err(|_| unavailable("store writer stopped"))
        });
        let (wal, log) = Wal::start(files, gen, checkpointer).map_err(unavailable)?;
        Ok(Self {
            shared: Arc::new(Shared {
                db,
                jobs: Some(tx),
                wal,
                hot: Mutex::default(),
                threads: vec![log, writer],
            }),
        })
    }

    /// Write a consistent copy of the database to `path`, a new file: every decision
    /// acknowledged before the call is in it. Requests go on being served meanwhile
    /// (the copy reads one snapshot). The copy is written beside `path` and renamed
    /// to it once complete, in transactions of [`BACKUP_ROWS`] records so that its
    /// memory stays bounded. A server started on a directory holding the copy (and
    /// the data directory's keys) starts from that state.
    pub async fn backup(&self, path: &Path) -> Result<()> {
        self.shared.wal.sync().await?;
        let (db, path) = (self.shared.db.clone(), path.to_owned());
        let copied = tokio::task::spawn_blocking(move || {
            let snapshot = db.begin_read().map_err(unavailable)?;
            let partial = path.with_extension("partial");
            for p in [&path, &partial] {
                if p.exists() {
                    return Err(StoreError::Conflict(p.display().to_string()));
                }
            }
            create_private_file(&partial)?;
            let copy = Database::create(&partial).map_err(unavailable)?;
            for def in ALL {
                let from = snapshot.open_table(def).map_err(unavailable)?;
                let mut rows = from.iter().map_err(unavailable)?.peekable();
                // Each table is created even when empty.
                loop {
                    let txn = copy.begin_write().map_err(unavailable)?;
                    {
                        let mut to = txn.open_table(def).map_err(unavailable)?;
                        for row in rows.by_ref().take(BACKUP_ROWS) {
                            let (k, v) = row.map_err(unavailable)?;
                            to.insert(k.value(), v.value()).map_err(unavailable)?;
                        }
                    }
                    txn.commit().map_err(unavailable)?;
                    if rows.peek().is_none() {
                        break;
                    }
                }
            }
            drop(copy);
            std::fs::rename(&partial, &path).map_err(unavailable)
        });
        copied.await.map_err(unavailable)?
    }

    /// Queue `f` for the next write transaction; the receiver answers after it commits.
    async fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R> + Send + 'static,
    ) -> Result<oneshot::Receiver<Result<R>>> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |txn| {
            let (status, value) = match f(txn) {
                Ok(v) => (Ok(()), Some(v)),
                Err(e) => (Err(e), None),
            };
            let done: Completer = Box::new(move |commit: Result<()>| {
                let _ = tx.send(commit.map(|()| value.expect("value present when ok")));
            });
            (status, done)
        });
        let jobs = self.shared.jobs.clone().expect("open store");
        // The channel is bounded: a full queue applies backpressure off the runtime.
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(job)) => {
                tokio::task::spawn_blocking(move || jobs.send(job))
                    .await
                    .map_err(unavailable)?
                    .map_err(|_| unavailable("store writer stopped"))?;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                return Err(unavailable("store writer stopped"))
            }
        }
        Ok(rx)
    }

    /// Run `f` in the next write transaction; answered after it commits.
    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        self.submit(f)
            .await?
            .await
            .map_err(|_| unavailable("store writer stopped"))?
    }

    fn read<R>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<R>) -> Result<R> {
        let txn = self.shared.db.begin_read().map_err(unavailable)?;
        f(&txn)
    }

    fn read_table<R>(
        &self,
        def: Def,
        f: impl FnOnce(&redb::ReadOnlyTable<&'static str, &'static [u8]>) -> Result<R>,
    ) -> Result<R> {
        self.read(|txn| f(&txn.open_table(def).map_err(unavailable)?))
    }

    async fn put(&self, def: Def, key: String, value: Vec<u8>) -> Result<()> {
        self.write(move |txn| {
            txn.open_table(def)
                .map_err(unavailable)?
                .insert(key.as_str(), value.as_slice())
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    /// Remove the record at `key`; whether there was one.
    async fn remove<T: DeserializeOwned + 'static>(
        &self,
        def: Def,
        key: String,
        index: Reindex<T>,
    ) -> Result<bool> {
        self.write(move |txn| {
            let mut t = txn.open_table(def).map_err(unavailable)?;
            let Some(was) = get::<T>(&t, &key)? else {
                return Ok(false);
            };
            t.remove(key.as_str()).map_err(unavailable)?;
            index(txn, Some(&was), None)?;
            Ok(true)
        })
        .await
    }

    /// Put `record` at `key` only if absent; otherwise `Conflict`.
    async fn insert_new<T: Serialize + Clone + Send + 'static>(
        &self,
        def: Def,
        key: String,
        record: &T,
        index: Reindex<T>,
    ) -> Result<()> {
        let record = record.clone();
        self.write(move |txn| {
            let mut t = txn.open_table(def).map_err(unavailable)?;
            if t.get(key.as_str()).map_err(unavailable)?.is_some() {
                return Ok(Err(StoreError::Conflict(key)));
            }
            t.insert(key.as_str(), encode(&record).as_slice())
                .map_err(unavailable)?;
            index(txn, None, Some(&record))?;
            Ok(Ok(()))
        })
        .await?
    }
}

impl EmbeddedStore {
    /// Store `record`, read at the revision it carries, at `key` as the next revision,
    /// if the stored record is still at that revision; otherwise `Changed`.
    async fn update_at_revision<T: Serialize + DeserializeOwned + Send + 'static>(
        &self,
        def: Def,
        key: String,
        mut record: T,
        revision: fn(&mut T) -> &mut u64,
        index: Reindex<T>,
    ) -> Result<()> {
        self.write(move |txn| {
            let mut t = txn.open_table(def).map_err(unavailable)?;
            let mut stored = get::<T>(&t, &key)?;
            if stored.as_mut().map(|s| *revision(s)) != Some(*revision(&mut record)) {
                let id = key.rsplit('/').next().unwrap_or_default();
                return Ok(Err(StoreError::Changed(id.to_owned())));
            }
            *revision(&mut record) += 1;
            t.insert(key.as_str(), encode(&record).as_slice())
                .map_err(unavailable)?;
            index(txn, stored.as_ref(), Some(&record))?;
            Ok(Ok(()))
        })
        .await?
    }

    /// Store `now` at `key` if the record there is still `was` (otherwise
    /// `Changed(id)`) and `refuse` finds nothing wrong with the change.
    async fn replace_if<T>(
        &self,
        def: Def,
        key: String,
        (was, now): (&T, &T),
        id: &str,
        (refuse, index): (Refusal<T>, Reindex<T>),
    ) -> Result<()>
    where
        T: Serialize + DeserializeOwned + PartialEq + Clone + Send + 'static,
    {
        let (was, now, id) = (was.clone(), now.clone(), id.to_owned());
        self.write(move |txn| {
            let mut t = txn.open_table(def).map_err(unavailable)?;
            if get::<T>(&t, &key)?.as_ref() != Some(&was) {
                return Ok(Err(StoreError::Changed(id)));
            }
            if let Some(refused) = refuse(txn, Some(&was), &now)? {
                return Ok(Err(refused));
            }
            t.insert(key.as_str(), encode(&now).as_slice())
                .map_err(unavailable)?;
            index(txn, Some(&was), Some(&now))?;
            Ok(Ok(()))
        })
        .await?
    }

    /// Set the `revoked_at` of the record at `key` (once); the record, if it exists.
    async fn revoke<T: Serialize + DeserializeOwned + Clone + Send + 'static>(
        &self,
        def: Def,
        key: String,
        now: u64,
        revoked_at: fn(&mut T) -> &mut Option<u64>,
        index: Reindex<T>,
    ) -> Result<Option<T>> {
        self.write(move |txn| {
            let mut t = txn.open_table(def).map_err(unavailable)?;
            let Some(mut record) = get::<T>(&t, &key)? else {
                return Ok(None);
            };
            if revoked_at(&mut record).is_none() {
                let was = record.clone();
                *revoked_at(&mut record) = Some(now);
                t.insert(key.as_str(), encode(&record).as_slice())
                    .map_err(unavailable)?;
                index(txn, Some(&was), Some(&record))?;
            }
            Ok(Some(record))
        })
        .await
    }
}

/// The writer thread: take jobs, run a batch in one transaction, commit, answer.
/// Decisions do not wait for it (they wait for the log), so it runs at a lower CPU
/// priority: a checkpoint's burst of work yields to requests in flight.
fn writer(db: Arc<Database>, rx: mpsc::Receiver<Job>) {
    // On Linux the nice value is per thread; failure only leaves the default.
    // SAFETY: setpriority has no memory-safety preconditions.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 5) };
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let txn = match db.begin_write() {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                for job in batch {
                    // Jobs need a transaction to build their completer; answer with the error.
                    drop(job);
                    tracing::error!(error = %msg, "store write transaction failed to start");
                }
                continue;
            }
        };
        let mut completers = Vec::with_capacity(batch.len());
        let mut failed: Option<String> = None;
        for job in batch {
            let (status, done) = job(&txn);
            if let Err(e) = status {
                // A job fails only on a storage error; the whole batch is abandoned.
                failed.get_or_insert_with(|| e.to_string());
            }
            completers.push(done);
        }
        let result = match failed {
            Some(msg) => {
                let _ = txn.abort();
                Err(StoreError::Unavailable(msg))
            }
            None => txn.commit().map_err(unavailable),
        };
        for done in completers {
            done(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::Unavailable(e.to_string())),
            });
        }
    }
}

#[async_trait]
impl SiteStore for EmbeddedStore {
    async fn create_site(&self, site: &Site) -> Result<()> {
        self.insert_new(SITES, site.site_id.clone(), site, index_site)
            .await
    }
    async fn update_site(&self, site: &Site) -> Result<()> {
        self.update_at_revision(
            SITES,
            site.site_id.clone(),
            site.clone(),
            |s| &mut s.revision,
            index_site,
        )
        .await
    }
    async fn delete_site(&self, site_id: &str) -> Result<bool> {
        // What only the site holds goes first, so a failure leaves the site for a
        // retry: its quota events (a thousand a transaction, as the purge drops
        // records), then its rate window, once the log has put its last ones in.
        self.shared.wal.sync().await?;
        let (id, prefix) = (site_id.to_owned(), format!("{site_id}/"));
        let mut all_gone = false;
        while !all_gone {
            let (id, prefix) = (id.clone(), prefix.clone());
            all_gone = self
                .write(move |txn| {
                    let mut events = txn.open_table(EVENTS).map_err(unavailable)?;
                    let mut keys = Vec::new();
                    for row in events.range(prefix.as_str()..).map_err(unavailable)? {
                        let k = row.map_err(unavailable)?.0.value().to_owned();
                        if !k.starts_with(&prefix) || keys.len() == PURGE_BATCH {
                            break;
                        }
                        keys.push(k);
                    }
                    for k in &keys {
                        events.remove(k.as_str()).map_err(unavailable)?;
                    }
                    let all_gone = keys.len() < PURGE_BATCH;
                    if all_gone {
                        let mut usage = txn.open_table(SITE_USAGE).map_err(unavailable)?;
                        usage.remove(id.as_str()).map_err(unavailable)?;
                    }
                    Ok(all_gone)
                })
                .await?;
        }
        self.shared.hot.lock().unwrap().sites.remove(site_id);
        self.remove(SITES, site_id.to_owned(), index_site).await
    }
    async fn get_site(&self, site_id: &str) -> Result<Option<Site>> {
        self.read_table(SITES, |t| get(t, site_id))
    }
    async fn list_sites_page(
        &self,
        owner: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<Site>> {
        let items = match owner {
            Some(owner) => {
                self.read(|txn| list_indexed(txn, OWNER_SITES, SITES, owner, after, limit + 1))?
            }
            None => self.read_table(SITES, |t| {
                let start = after.map_or(Bound::Unbounded, Excluded);
                let mut out = Vec::new();
                for row in t
                    .range::<&str>((start, Bound::Unbounded))
                    .map_err(unavailable)?
                    .take(limit + 1)
                {
                    out.push(decode(row.map_err(unavailable)?.1.value())?);
                }
                Ok(out)
            })?,
        };
        Ok(page_of(items, limit, |s: &Site| s.site_id.clone()))
    }
}

#[async_trait]
impl PlanStore for EmbeddedStore {
    async fn create_plan(&self, plan: &Plan) -> Result<()> {
        self.insert_new(
            PLANS,
            format!("{}/{}", plan.site_id, plan.plan_id),
            plan,
            unindexed,
        )
        .await
    }
    async fn update_plan(&self, plan: &Plan) -> Result<()> {
        let key = format!("{}/{}", plan.site_id, plan.plan_id);
        self.update_at_revision(PLANS, key, plan.clone(), |p| &mut p.revision, unindexed)
            .await
    }
    async fn delete_plan(&self, site_id: &str, plan_id: &str) -> Result<PlanDeletion> {
        let key = format!("{site_id}/{plan_id}");
        self.write(move |txn| {
            let mut plans = txn.open_table(PLANS).map_err(unavailable)?;
            if plans.get(key.as_str()).map_err(unavailable)?.is_none() {
                return Ok(PlanDeletion::NotFound);
            }
            let prefix = format!("{key}/");
            let mut active = 0;
            let index = txn.open_table(PLAN_TOKENS).map_err(unavailable)?;
            for row in index.range(prefix.as_str()..).map_err(unavailable)? {
                if !row.map_err(unavailable)?.0.value().starts_with(&prefix) {
                    break;
                }
                active += 1;
            }
            if active > 0 {
                return Ok(PlanDeletion::InUse(active));
            }
            plans.remove(key.as_str()).map_err(unavailable)?;
            Ok(PlanDeletion::Deleted)
        })
        .await
    }
    async fn get_plan(&self, site_id: &str, plan_id: &str) -> Result<Option<Plan>> {
        self.read_table(PLANS, |t| get(t, &format!("{site_id}/{plan_id}")))
    }
    async fn list_plans(&self, site_id: &str) -> Result<Vec<Plan>> {
        self.read_table(PLANS, |t| list_prefix(t, site_id))
    }
}

#[async_trait]
impl TokenStore for EmbeddedStore {
    async fn create_token(&self, token: &Token) -> Result<()> {
        let token = token.clone();
        self.write(move |txn| {
            if let Some(refused) = planless(txn, None, &token)? {
                return Ok(Err(refused));
            }
            let key = format!("{}/{}", token.site_id, token.token_id);
            let mut hashes = txn.open_table(TOKEN_HASH).map_err(unavailable)?;
            if hashes
                .get(token.token_hash.as_str())
                .map_err(unavailable)?
                .is_some()
            {
                return Ok(Err(StoreError::Conflict("token".into())));
            }
            hashes
                .insert(token.token_hash.as_str(), key.as_bytes())
                .map_err(unavailable)?;
            txn.open_table(TOKENS)
                .map_err(unavailable)?
                .insert(key.as_str(), encode(&token).as_slice())
                .map_err(unavailable)?;
            index_token(txn, None, Some(&token))?;
            Ok(Ok(()))
        })
        .await?
    }
    async fn get_token(&self, site_id: &str, token_id: &str) -> Result<Option<Token>> {
        self.read_table(TOKENS, |t| get(t, &format!("{site_id}/{token_id}")))
    }
    async fn token_by_hash(&self, token_hash: &str) -> Result<Option<Token>> {
        self.read(|txn| {
            let hashes = txn.open_table(TOKEN_HASH).map_err(unavailable)?;
            match get_str(&hashes, token_hash)? {
                Some(key) => get(&txn.open_table(TOKENS).map_err(unavailable)?, &key),
                None => Ok(None),
            }
        })
    }
    async fn list_tokens_page(
        &self,
        site_id: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<Token>> {
        let items = self.read_table(TOKENS, |t| list_prefix_after(t, site_id, after, limit + 1))?;
        Ok(page_of(items, limit, |t: &Token| t.token_id.clone()))
    }
    async fn list_consumer_tokens_page(
        &self,
        consumer: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<Token>> {
        let items = self
            .read(|txn| list_indexed(txn, CONSUMER_TOKENS, TOKENS, consumer, after, limit + 1))?;
        Ok(page_of(items, limit, |t: &Token| t.token_id.clone()))
    }
    async fn update_token(&self, was: &Token, now: &Token) -> Result<()> {
        let key = format!("{}/{}", was.site_id, was.token_id);
        let checks = (planless as Refusal<Token>, index_token as Reindex<Token>);
        self.replace_if(TOKENS, key, (was, now), &was.token_id, checks)
            .await
    }
    async fn revoke_token(&self, site_id: &str, token_id: &str, now: u64) -> Result<Option<Token>> {
        let revoked = self
            .revoke(
                TOKENS,
                format!("{site_id}/{token_id}"),
                now,
                |t: &mut Token| &mut t.revoked_at,
                index_token,
            )
            .await?;
        // Decisions read revocation from memory: the next one sees it.
        if revoked.is_some() {
            if let Some(t) = self.shared.hot.lock().unwrap().tokens.get_mut(token_id) {
                t.revoked = true;
            }
        }
        Ok(revoked)
    }
}

#[async_trait]
impl KeyStore for EmbeddedStore {
    async fn create_key(&self, key: &ApiKey) -> Result<()> {
        let key = key.clone();
        self.write(move |txn| {
            let k = format!("{}/{}", key.site_id, key.key_id);
            txn.open_table(KEY_HASH)
                .map_err(unavailable)?
                .insert(key.key_hash.as_str(), k.as_bytes())
                .map_err(unavailable)?;
            txn.open_table(KEYS)
                .map_err(unavailable)?
                .insert(k.as_str(), encode(&key).as_slice())
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }
    async fn key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKey>> {
        self.read(|txn| {
            let hashes = txn.open_table(KEY_HASH).map_err(unavailable)?;
            match get_str(&hashes, key_hash)? {
                Some(k) => get(&txn.open_table(KEYS).map_err(unavailable)?, &k),
                None => Ok(None),
            }
        })
    }
    async fn list_keys(&self, site_id: &str) -> Result<Vec<ApiKey>> {
        self.read_table(KEYS, |t| list_prefix(t, site_id))
    }
    async fn revoke_key(&self, site_id: &str, key_id: &str, now: u64) -> Result<Option<ApiKey>> {
        self.revoke(
            KEYS,
            format!("{site_id}/{key_id}"),
            now,
            |k: &mut ApiKey| &mut k.revoked_at,
            unindexed,
        )
        .await
    }
    async fn update_key(&self, was: &ApiKey, now: &ApiKey) -> Result<()> {
        let key = format!("{}/{}", was.site_id, was.key_id);
        self.replace_if(KEYS, key, (was, now), &was.key_id, (unrefused, unindexed))
            .await
    }
}

fn put_audit(txn: &WriteTransaction, record: &AuditRecord) -> Result<()> {
    txn.open_table(AUDIT)
        .map_err(unavailable)?
        .insert(audit_key(record).as_str(), encode(record).as_slice())
        .map_err(unavailable)?;
    Ok(())
}

/// The next log generation to apply (1 for a new database).
fn next_gen(txn: &WriteTransaction) -> Result<u64> {
    let t = txn.open_table(META).map_err(unavailable)?;
    let Some(v) = t.get(NEXT_GEN).map_err(unavailable)? else {
        return Ok(1);
    };
    let bytes: [u8; 8] = v
        .value()
        .try_into()
        .map_err(|_| StoreError::Corrupt(NEXT_GEN.into()))?;
    Ok(u64::from_le_bytes(bytes))
}

fn set_next_gen(txn: &WriteTransaction, gen: u64) -> Result<()> {
    txn.open_table(META)
        .map_err(unavailable)?
        .insert(NEXT_GEN, gen.to_le_bytes().as_slice())
        .map_err(unavailable)?;
    Ok(())
}

/// Apply a log generation's puts. A key put many times (a busy token's usage, a
/// site's window) is written once, with its last value: the same end state for a
/// fraction of the B-tree work. A put-if-absent is skipped when the generation also
/// puts its key outright, since that put decides the end state either way. Audit
/// records (each put once) are written as blocks ([`put_audit_blocks`]).
fn apply_logged(txn: &WriteTransaction, gen: u64, puts: &[u8]) -> Result<()> {
    if puts.is_empty() {
        return Ok(());
    }
    let puts = wal::decode_puts(puts)?;
    let mut audit = Vec::new();
    let mut last: HashMap<(u8, &str), usize> = HashMap::new();
    for (i, p) in puts.iter().enumerate() {
        if p.table == L_AUDIT {
            audit.push((p.key, p.value));
        } else if !p.if_absent {
            last.insert((p.table, p.key), i);
        }
    }
    let mut tables = Vec::with_capacity(LOGGED.len());
    for def in LOGGED {
        tables.push(txn.open_table(def).map_err(unavailable)?);
    }
    for (i, p) in puts.iter().enumerate() {
        if p.table == L_AUDIT {
            continue;
        }
        let t = tables
            .get_mut(p.table as usize)
            .ok_or_else(|| StoreError::Corrupt(format!("log entry for table {}", p.table)))?;
        let outright = last.get(&(p.table, p.key));
        if p.if_absent {
            if outright.is_some() || t.get(p.key).map_err(unavailable)?.is_some() {
                continue;
            }
        } else if outright != Some(&i) {
            continue;
        }
        t.insert(p.key, p.value).map_err(unavailable)?;
    }
    put_audit_blocks(&mut tables[L_AUDIT as usize], gen, audit)
}

/// A checkpoint as a writer job: its puts and the next generation, in one commit.
fn checkpoint_job(c: Checkpoint) -> Job {
    Box::new(move |txn| {
        let status = apply_logged(txn, c.gen, &c.puts).and_then(|()| set_next_gen(txn, c.gen + 1));
        (status, c.done)
    })
}

impl EmbeddedStore {
    /// Bring a token's and a site's counters into memory (the caller holds `hot`).
    fn load(&self, hot: &mut Hot, site_id: &str, token_id: &str) -> Result<()> {
        if hot.tokens.contains_key(token_id) && hot.sites.contains_key(site_id) {
            // The usual case: no read transaction.
            return Ok(());
        }
        self.read(|txn| {
            if !hot.tokens.contains_key(token_id) {
                let tokens = txn.open_table(TOKENS).map_err(unavailable)?;
                let token: Option<Token> = get(&tokens, &format!("{site_id}/{token_id}"))?;
                let usage = get(&txn.open_table(USAGE).map_err(unavailable)?, token_id)?;
                if hot.tokens.len() >= MAX_HOT_TOKENS {
                    let applied = self.shared.wal.applied_seq();
                    hot.tokens.retain(|_, t| t.seq > applied);
                }
                hot.tokens.insert(
                    token_id.to_owned(),
                    HotToken {
                        usage: usage.unwrap_or_default(),
                        revoked: token.is_none_or(|t| t.revoked_at.is_some()),
                        seq: 0,
                    },
                );
            }
            if !hot.sites.contains_key(site_id) {
                let sites = txn.open_table(SITE_USAGE).map_err(unavailable)?;
                let window = get(&sites, site_id)?.unwrap_or_default();
                hot.sites.insert(site_id.to_owned(), window);
            }
            Ok(())
        })
    }
}

#[async_trait]
impl UsageStore for EmbeddedStore {
    async fn count_request(&self, mut req: CountRequest) -> Result<Counting> {
        let (counted, written) = {
            let mut guard = self.shared.hot.lock().unwrap();
            self.load(&mut guard, &req.site_id, &req.token_id)?;
            let Hot { tokens, sites, seq } = &mut *guard;
            let token = tokens.get_mut(&req.token_id).expect("loaded");
            let site = sites.get_mut(&req.site_id).expect("loaded");
            let mut puts = Puts::default();
            let counted = if token.revoked {
                Counted::Revoked
            } else {
                let eval = limits::evaluate(
                    token.usage,
                    *site,
                    req.limits,
                    req.site_requests_per_second,
                    req.now_ms,
                );
                if eval.verdict == Verdict::Allow {
                    token.usage = eval.usage;
                    *site = eval.site;
                    puts.put_json(L_USAGE, &req.token_id, &eval.usage);
                    puts.put_json(L_SITE_USAGE, &req.site_id, &eval.site);
                    for kind in &eval.events {
                        let key = format!(
                            "{}/{}/{}/{}",
                            req.site_id,
                            req.token_id,
                            eval.usage.quota.period,
                            kind.as_str()
                        );
                        puts.put_json_if_absent(L_EVENTS, &key, &req.quota_event(&eval, *kind));
                    }
                }
                Counted::Evaluated(eval)
            };
            req.record_outcome(&counted);
            puts.put_json(L_AUDIT, &audit_key(&req.audit), &req.audit);
            *seq += 1;
            token.seq = *seq;
            // Appended under the lock: the log's order is the decisions' order.
            (counted, self.shared.wal.append(puts, *seq)?)
        };
        Ok(Counting {
            counted,
            durable: Box::pin(async move {
                written
                    .await
                    .map_err(|_| unavailable("write-ahead log stopped"))?
            }),
        })
    }

    async fn record_failed_attempt(
        &self,
        site_id: &str,
        client: Option<&str>,
        audit: AuditRecord,
    ) -> Result<u64> {
        let key = client.map(|c| format!("{site_id}/{c}"));
        self.write(move |txn| {
            let mut attempts = 0;
            if let Some(key) = key {
                let mut t = txn.open_table(FAILED).map_err(unavailable)?;
                let w: SlidingWindow = get(&t, &key)?.unwrap_or_default();
                let w = w.record(audit.ts_ms);
                attempts = w.used(audit.ts_ms);
                t.insert(key.as_str(), encode(&w).as_slice())
                    .map_err(unavailable)?;
            }
            put_audit(txn, &audit)?;
            Ok(attempts)
        })
        .await
    }

    async fn token_usage(&self, token_id: &str) -> Result<TokenUsage> {
        if let Some(t) = self.shared.hot.lock().unwrap().tokens.get(token_id) {
            return Ok(t.usage);
        }
        Ok(self
            .read_table(USAGE, |t| get(t, token_id))?
            .unwrap_or_default())
    }
}

#[async_trait]
impl AuditStore for EmbeddedStore {
    async fn append_audit(&self, record: AuditRecord) -> Result<()> {
        self.write(move |txn| put_audit(txn, &record)).await
    }

    async fn query_audit(
        &self,
        site_id: &str,
        filter: &AuditFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<AuditRecord>> {
        self.query_audit_reading(site_id, filter, limit, cursor, AUDIT_READ_BUDGET)
            .await
    }

    async fn purge_expired(&self, now_s: u64) -> Result<u64> {
        self.purge(now_s, PURGE_BATCH).await
    }
}

/// About the most records one logs query reads (~0.1 s). A filter that few records
/// match would otherwise read the whole 90 days for one page; past this the page
/// ends early, with fewer items and a cursor to go on from.
const AUDIT_READ_BUDGET: usize = 100_000;

impl EmbeddedStore {
    async fn query_audit_reading(
        &self,
        site_id: &str,
        filter: &AuditFilter,
        limit: usize,
        cursor: Option<&str>,
        budget: usize,
    ) -> Result<Page<AuditRecord>> {
        self.shared.wal.sync().await?;
        // Records with keys in lo..hi, newest (greatest key) first.
        let lo = format!(
            "{site_id}/{:013}",
            filter.from_ms.unwrap_or(0).min(MAX_KEY_TS)
        );
        let (mut hi, mut hi_ts) = match filter.to_ms {
            Some(to) => {
                let to = to.min(MAX_KEY_TS);
                (format!("{site_id}/{to:013}0"), Some(to)) // records at `to` included
            }
            None => (format!("{site_id}0"), None),
        };
        if let Some(c) = cursor {
            let after = URL_SAFE_NO_PAD
                .decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|k| k.starts_with(&format!("{site_id}/")))
                .and_then(|k| Some((key_ts(&k).ok()?, k)))
                .ok_or(StoreError::InvalidCursor)?;
            if after.1 < hi {
                (hi_ts, hi) = (Some(after.0), after.1);
            }
        }
        // A value is keyed by its newest record, and a block spans at most
        // AUDIT_BLOCK_SPAN_MS: values keyed past that hold no record below `hi`.
        let values_hi = match hi_ts {
            Some(ts) => format!(
                "{site_id}/{:013}0",
                (ts + AUDIT_BLOCK_SPAN_MS).min(MAX_KEY_TS)
            ),
            None => format!("{site_id}0"),
        };
        self.read_table(AUDIT, |t| {
            let mut page = AuditPage::new(limit);
            let mut read = 0;
            if lo >= values_hi {
                return Ok(page.finish());
            }
            for row in t
                .range(lo.as_str()..values_hi.as_str())
                .map_err(unavailable)?
                .rev()
            {
                let (k, v) = row.map_err(unavailable)?;
                // Values still unread hold records no newer than this one's newest.
                let newest = key_ts(k.value())?;
                if page.emit(Some(newest)) {
                    return Ok(page.finish());
                }
                if read >= budget {
                    // Every match newer than `newest` is on the page: go on below it,
                    // once that is below where this page started (values keyed
                    // above it can still hold older records).
                    let below = format!("{site_id}/{:013}", newest + 1);
                    if below < hi {
                        return Ok(page.finish_before(below));
                    }
                }
                for (key, json) in audit_records(k.value(), v.value())? {
                    if key < lo.as_str() || key >= hi.as_str() {
                        continue;
                    }
                    read += 1;
                    let r: AuditRecord = decode(json)?;
                    if filter.matches(&r) {
                        page.pending.push(Pending(key.to_owned(), r));
                    }
                }
            }
            page.emit(None);
            Ok(page.finish())
        })
    }
}

/// About the most records one purge transaction looks at (a site it skips past
/// counts as one). The log's checkpoints run between two such transactions, so
/// decisions never wait long behind a purge, however much there is to purge.
const PURGE_BATCH: usize = 1024;

impl EmbeddedStore {
    async fn purge(&self, now_s: u64, batch: usize) -> Result<u64> {
        // On what the log holds too: usage still in it would bring a purged
        // token's usage back.
        self.shared.wal.sync().await?;
        let (kept_since, mut purged, mut from) =
            (audit_kept_since_ms(now_s), 0, Some(String::new()));
        while let Some(at) = from {
            let started = std::time::Instant::now();
            let (n, next) = self
                .write(move |txn| purge_audit(txn, &at, kept_since, batch))
                .await?;
            (purged, from) = (purged + n, next);
            // Nothing is in a hurry: leave the disk to the log as long again.
            tokio::time::sleep(started.elapsed()).await;
        }
        // The failed-attempt counters of clients with none in the last minute: one
        // exists per client that ever sent a bad token (the DynamoDB store's expire
        // by TTL).
        let now_ms = now_s * 1000;
        let quiet = move |w: &SlidingWindow| w.used(now_ms) == 0;
        self.drop_old(FAILED, batch, quiet, |_, _| Ok(()), |_| {})
            .await?;
        // API keys and tokens revoked longer ago than they are kept, with what they
        // left in other tables (the DynamoDB store's expire by TTL).
        let old_key = move |k: &ApiKey| !k.kept_at(now_s);
        self.drop_old(KEYS, batch, old_key, drop_key_hashes, |_| {})
            .await?;
        let old_token = move |t: &Token| !t.kept_at(now_s);
        // A dropped token is revoked, so nothing of it waits in the log.
        let forget = |tokens: &[Token]| {
            let hot = &mut self.shared.hot.lock().unwrap().tokens;
            tokens.iter().for_each(|t| _ = hot.remove(&t.token_id));
        };
        self.drop_old(TOKENS, batch, old_token, drop_token_traces, forget)
            .await?;
        Ok(purged)
    }

    /// Drop the records of `def` that `gone` picks. They are looked for `batch` at a
    /// time in a snapshot, so the writer is held only for those found, checked again
    /// and dropped in one write transaction that `also` completes (what they leave in
    /// other tables); `after` then sees them. Paced as the audit purge is. Only the
    /// local server's hourly purge uses it.
    async fn drop_old<T: DeserializeOwned + Send + 'static>(
        &self,
        def: Def,
        batch: usize,
        gone: impl Fn(&T) -> bool + Clone + Send + Sync + 'static,
        also: fn(&WriteTransaction, &[T]) -> Result<()>,
        after: impl Fn(&[T]),
    ) -> Result<()> {
        let mut from = String::new();
        loop {
            let started = std::time::Instant::now();
            // Off the runtime: decoding a batch takes about a millisecond.
            let (db, look) = (self.shared.db.clone(), gone.clone());
            let scan = move || -> Result<(Vec<String>, Option<String>)> {
                let txn = db.begin_read().map_err(unavailable)?;
                let t = txn.open_table(def).map_err(unavailable)?;
                let (mut found, mut next) = (Vec::new(), None);
                for (i, row) in t.range(from.as_str()..).map_err(unavailable)?.enumerate() {
                    let (k, v) = row.map_err(unavailable)?;
                    if i == batch {
                        next = Some(k.value().to_owned());
                        break;
                    }
                    if look(&decode(v.value())?) {
                        found.push(k.value().to_owned());
                    }
                }
                Ok((found, next))
            };
            let (found, next) = tokio::task::spawn_blocking(scan)
                .await
                .map_err(|e| unavailable(format!("purge scan: {e}")))??;
            if !found.is_empty() {
                let gone = gone.clone();
                let dropped = self
                    .write(move |txn| {
                        let mut dropped = Vec::with_capacity(found.len());
                        let mut t = txn.open_table(def).map_err(unavailable)?;
                        for k in found {
                            if let Some(record) = get(&t, &k)?.filter(&gone) {
                                t.remove(k.as_str()).map_err(unavailable)?;
                                dropped.push(record);
                            }
                        }
                        drop(t);
                        also(txn, &dropped)?;
                        Ok(dropped)
                    })
                    .await?;
                after(&dropped);
            }
            tokio::time::sleep(started.elapsed()).await;
            match next {
                Some(key) => from = key,
                None => return Ok(()),
            }
        }
    }
}

/// Drop the audit records made before `kept_since` (ms): they are past their
/// retention ([`audit_kept_since_ms`]). A record's time is in its key, and a value
/// (a record, or a checkpoint's block) is keyed by its newest record and spans at
/// most [`AUDIT_BLOCK_SPAN_MS`]; so each site's expired records are in the values
/// at the start of its key range, and only those are read.
fn purge_audit(
    txn: &WriteTransaction,
    from: &str,
    kept_since: u64,
    batch: usize,
) -> Result<(u64, Option<String>)> {
    let mut t = txn.open_table(AUDIT).map_err(unavailable)?;
    let (mut purged, mut work) = (0, 0);
    let mut changes = Vec::new();
    let mut at = from.to_owned();
    let next = 'sites: loop {
        let Some(row) = t.range(at.as_str()..).map_err(unavailable)?.next() else {
            break None;
        };
        let first = row.map_err(unavailable)?.0.value().to_owned();
        let site = first.split('/').next().unwrap_or_default().to_owned();
        let end = format!(
            "{site}/{:013}",
            (kept_since + AUDIT_BLOCK_SPAN_MS).min(MAX_KEY_TS)
        );
        for row in t.range(first.as_str()..end.as_str()).map_err(unavailable)? {
            let (k, v) = row.map_err(unavailable)?;
            if work >= batch {
                break 'sites Some(k.value().to_owned());
            }
            let records = audit_records(k.value(), v.value())?;
            work += records.len();
            let mut kept = Vec::with_capacity(records.len());
            for &(key, json) in &records {
                if key_ts(key)? >= kept_since {
                    kept.push((key, json));
                }
            }
            if kept.len() < records.len() {
                purged += (records.len() - kept.len()) as u64;
                let rewritten = (!kept.is_empty()).then(|| audit_block(kept));
                changes.push((k.value().to_owned(), rewritten));
            }
        }
        // Past every key of this site: `/` sorts below any character of an id, `:`
        // above any digit.
        at = format!("{site}/:");
        work += 1;
        if work >= batch {
            break Some(at);
        }
    };
    for (k, v) in changes {
        match v {
            Some(v) => t.insert(k.as_str(), v.as_slice()),
            None => t.remove(k.as_str()),
        }
        .map_err(unavailable)?;
    }
    Ok((purged, next))
}

/// What a dropped API key leaves: its hash.
fn drop_key_hashes(txn: &WriteTransaction, keys: &[ApiKey]) -> Result<()> {
    let mut hashes = txn.open_table(KEY_HASH).map_err(unavailable)?;
    for k in keys {
        hashes.remove(k.key_hash.as_str()).map_err(unavailable)?;
    }
    Ok(())
}

/// What a dropped token leaves: its hash, its usage and its consumer index entry.
fn drop_token_traces(txn: &WriteTransaction, tokens: &[Token]) -> Result<()> {
    {
        let mut hashes = txn.open_table(TOKEN_HASH).map_err(unavailable)?;
        let mut usage = txn.open_table(USAGE).map_err(unavailable)?;
        for t in tokens {
            hashes.remove(t.token_hash.as_str()).map_err(unavailable)?;
            usage.remove(t.token_id.as_str()).map_err(unavailable)?;
        }
    }
    for t in tokens {
        index_token(txn, Some(t), None)?;
    }
    Ok(())
}

/// A record waiting to be emitted, ordered by its key.
struct Pending(String, AuditRecord);

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

/// A page of the logs query, merged from values read newest-keyed first (blocks of
/// neighbouring checkpoints may overlap in time).
struct AuditPage {
    limit: usize,
    pending: std::collections::BinaryHeap<Pending>,
    items: Vec<AuditRecord>,
    last_key: Option<String>,
    more: bool,
}

impl AuditPage {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            pending: Default::default(),
            items: Vec::new(),
            last_key: None,
            more: false,
        }
    }

    /// Move pending records newer than `newer_than` (all if `None`) to the page;
    /// true once it is full and a further match is known.
    fn emit(&mut self, newer_than: Option<u64>) -> bool {
        while let Some(top) = self.pending.peek() {
            // A record's key holds its `ts_ms` (see `audit_key`).
            if newer_than.is_some_and(|ts| top.1.ts_ms <= ts) {
                break;
            }
            let Pending(key, r) = self.pending.pop().expect("peeked");
            if self.push(key, r) {
                return true;
            }
        }
        false
    }

    fn push(&mut self, key: String, r: AuditRecord) -> bool {
        if self.items.len() == self.limit {
            self.more = true;
            return true;
        }
        self.last_key = Some(key);
        self.items.push(r);
        false
    }

    /// The page, ended early: the next one starts below the key `below`.
    fn finish_before(self, below: String) -> Page<AuditRecord> {
        Page {
            items: self.items,
            next_cursor: Some(URL_SAFE_NO_PAD.encode(below)),
        }
    }

    fn finish(self) -> Page<AuditRecord> {
        Page {
            items: self.items,
            next_cursor: if self.more {
                self.last_key.map(|k| URL_SAFE_NO_PAD.encode(k))
            } else {
                None
            },
        }
    }
}

#[async_trait]
impl EventStore for EmbeddedStore {
    async fn list_events(
        &self,
        site_id: &str,
        limit: usize,
        after: Option<(&str, u32, &str)>,
    ) -> Result<Page<QuotaEvent>> {
        self.shared.wal.sync().await?;
        let after = after.map(|(token, period, kind)| format!("{token}/{period}/{kind}"));
        let items = self.read_table(EVENTS, |t| {
            list_prefix_after(t, site_id, after.as_deref(), limit + 1)
        })?;
        Ok(page_of(items, limit, event_cursor))
    }
}

#[async_trait]
impl AdminTrail for EmbeddedStore {
    async fn record_admin(&self, event: &AdminEvent) -> Result<()> {
        self.put(
            ADMIN,
            format!("{:013}/{}", event.ts_ms, event.id),
            encode(event),
        )
        .await
    }
    async fn list_admin(
        &self,
        limit: usize,
        owner: Option<&str>,
        before: Option<(u64, &str)>,
    ) -> Result<Page<AdminEvent>> {
        use std::ops::Bound::{Excluded, Unbounded};
        let end = before.map(|(ts, id)| format!("{ts:013}/{id}"));
        self.read_table(ADMIN, |t| {
            let range = (Unbounded, end.as_deref().map_or(Unbounded, Excluded));
            let mut items = Vec::new();
            for row in t.range::<&str>(range).map_err(unavailable)?.rev() {
                let (_, v) = row.map_err(unavailable)?;
                let e: AdminEvent = decode(v.value())?;
                if owner.is_none_or(|o| e.owner.as_deref() == Some(o)) {
                    items.push(e);
                    if items.len() > limit {
                        break;
                    }
                }
            }
            Ok(page_of(items, limit, admin_cursor))
        })
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn ping(&self) -> Result<()> {
        // A real read transaction and a real (empty) durable commit; the log works.
        if let Some(e) = self.shared.wal.failure() {
            return Err(unavailable(format!("write-ahead log: {e}")));
        }
        self.read_table(SITES, |_| Ok(()))?;
        self.write(|_| Ok(())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = "plan_0000000000000000";

    /// Store `site` with a plan `PLAN`, for tokens to be issued on.
    async fn site_with_plan(store: &EmbeddedStore, site: &Site) {
        store.create_site(site).await.unwrap();
        let plan = Plan {
            plan_id: PLAN.into(),
            ..Plan::new(&site.site_id, "pro", 60, 1000, 1)
        };
        store.create_plan(&plan).await.unwrap();
    }

    /// Deleting a site drops its rate window, from the database and from memory, and
    /// not another site's.
    #[tokio::test]
    async fn deleting_a_site_drops_its_rate_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("t.redb")).unwrap();
        let key = crate::seal::SealingKey::from_bytes(&[9; 32]);
        let sites: Vec<Site> = (0..2)
            .map(|_| Site::new("alice", "s", "https://api.example.com", &key, 1).0)
            .collect();
        let now = crate::domain::now_ms();
        for site in &sites {
            site_with_plan(&store, site).await;
            let token_id = crate::ids::token_id();
            store
                .create_token(&Token {
                    token_id: token_id.clone(),
                    site_id: site.site_id.clone(),
                    plan_id: PLAN.into(),
                    token_hash: crate::ids::hash_secret(&crate::ids::consumer_token()),
                    label: None,
                    consumer: None,
                    created_at: 1,
                    revoked_at: None,
                })
                .await
                .unwrap();
            let counting = store.count_request(CountRequest {
                site_id: site.site_id.clone(),
                token_id,
                plan_name: "pro".into(),
                limits: limits::PlanLimits {
                    requests_per_minute: 60,
                    monthly_quota: 100,
                },
                site_requests_per_second: 10,
                now_ms: now,
                audit: crate::domain::test_record(&site.site_id, now, "/"),
            });
            counting.await.unwrap().durable.await.unwrap();
        }
        assert!(store.delete_site(&sites[0].site_id).await.unwrap());
        store.shared.wal.sync().await.unwrap();
        let window = |id: &str| {
            (store.read_table(SITE_USAGE, |t| get::<SecondWindow>(t, id)))
                .unwrap()
                .is_some()
        };
        let hot = |id: &str| store.shared.hot.lock().unwrap().sites.contains_key(id);
        assert!(!window(&sites[0].site_id) && !hot(&sites[0].site_id));
        assert!(window(&sites[1].site_id) && hot(&sites[1].site_id));
    }

    /// A logs query that reads only `budget` records a call still returns every
    /// match once, newest first, over more pages (some of them empty).
    #[tokio::test]
    async fn a_query_past_its_read_budget_goes_on_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("t.redb")).unwrap();
        let t0 = 1_795_000_020_000;
        let record = |ts_ms, path| crate::domain::test_record("site_a", ts_ms, path);
        // Single records, every seventh a match, and two checkpoint blocks whose
        // times interleave with them and with each other.
        let singles: Vec<AuditRecord> = (0..60)
            .map(|i| record(t0 + i * 10, if i % 7 == 0 { "/match" } else { "/other" }))
            .collect();
        let blocks: Vec<(String, Vec<u8>)> = (0..30)
            .map(|i| {
                record(
                    t0 + 5 + i * 20,
                    if i % 4 == 0 { "/match" } else { "/other" },
                )
            })
            .map(|r| (audit_key(&r), encode(&r)))
            .collect();
        let all: Vec<AuditRecord> = singles.clone();
        store
            .write(move |txn| {
                for r in &singles {
                    put_audit(txn, r)?;
                }
                let mut t = txn.open_table(AUDIT).map_err(unavailable)?;
                for (gen, half) in blocks.chunks(15).enumerate() {
                    let records = half.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
                    put_audit_blocks(&mut t, gen as u64, records.collect())?;
                }
                Ok(())
            })
            .await
            .unwrap();
        let matches = AuditFilter {
            path_prefix: Some("/match".into()),
            ..Default::default()
        };
        let everything = store
            .query_audit("site_a", &matches, 1000, None)
            .await
            .unwrap();
        assert!(everything.next_cursor.is_none());
        let expected: Vec<u64> = everything.items.iter().map(|r| r.ts_ms).collect();
        assert_eq!(expected.len(), 9 + 8);
        assert!(expected.windows(2).all(|w| w[0] > w[1]));
        assert!(all
            .iter()
            .filter(|r| r.path == "/match")
            .all(|r| expected.contains(&r.ts_ms)));
        for budget in [1, 3, 10] {
            let (store, matches) = (&store, &matches);
            let (seen, pages) = all_pages(2, |cursor| async move {
                let cursor = cursor.as_deref();
                store
                    .query_audit_reading("site_a", matches, 2, cursor, budget)
                    .await
            })
            .await;
            assert_eq!(seen, expected, "budget {budget}");
            assert!(pages > expected.len() / 2, "budget {budget}: {pages} pages");
        }
    }

    /// Every site's expired records go, whatever the batch size: a purge that stops
    /// mid-site or between sites goes on where it stopped.
    #[tokio::test]
    async fn purging_in_batches_drops_every_expired_record_and_only_those() {
        let now_s = 1_795_000_020 + crate::domain::AUDIT_RETENTION_SECS;
        let edge = audit_kept_since_ms(now_s);
        for batch in [1, 2, 3, 5, PURGE_BATCH] {
            let dir = tempfile::tempdir().unwrap();
            let store = EmbeddedStore::open(&dir.path().join("t.redb")).unwrap();
            let key = |site: &str, ts: u64, id: u64| format!("{site}/{ts:013}/log_{id}");
            let mut keys = Vec::new();
            for (i, site) in ["site_a", "site_ab", "site_b", "site_c"].iter().enumerate() {
                // Records one by one: expired, expired, kept (not for site_b).
                for ts in [edge - 90_000, edge - 1, edge + i as u64]
                    .into_iter()
                    .take(2 + (i != 2) as usize)
                {
                    keys.push(key(site, ts, 1));
                }
                // A checkpoint's block straddling the edge, and one all expired.
                keys.extend([key(site, edge - 2, 2), key(site, edge, 3)]);
                keys.extend([key(site, edge - 5_000, 4), key(site, edge - 4_500, 5)]);
            }
            let (all, total) = (keys.clone(), keys.len());
            store
                .write(move |txn| {
                    let mut t = txn.open_table(AUDIT).map_err(unavailable)?;
                    for k in &keys[..] {
                        if k.ends_with("log_1") {
                            t.insert(k.as_str(), b"{}".as_slice())
                                .map_err(unavailable)?;
                        }
                    }
                    let blocks = keys.iter().filter(|k| !k.ends_with("log_1"));
                    put_audit_blocks(
                        &mut t,
                        7,
                        blocks.map(|k| (k.as_str(), &b"{}"[..])).collect(),
                    )
                })
                .await
                .unwrap();
            let purged = store.purge(now_s, batch).await.unwrap();
            let mut left: Vec<String> = Vec::new();
            store
                .read_table(AUDIT, |t| {
                    for row in t.iter().map_err(unavailable)? {
                        let (k, v) = row.map_err(unavailable)?;
                        for (key, _) in audit_records(k.value(), v.value())? {
                            left.push(key.to_owned());
                        }
                    }
                    Ok(())
                })
                .unwrap();
            let mut kept: Vec<String> = all
                .into_iter()
                .filter(|k| key_ts(k).unwrap() >= edge)
                .collect();
            kept.sort();
            left.sort();
            assert_eq!(left, kept, "batch {batch}");
            assert_eq!(purged as usize, total - kept.len(), "batch {batch}");
        }
    }

    #[tokio::test]
    async fn retention_also_drops_quiet_failed_attempt_counters() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("t.redb")).unwrap();
        let now_ms = 1_795_000_020_000;
        let audit = |ts_ms| crate::domain::test_record("site_a", ts_ms, "/");
        for (client, ts_ms) in [("old", now_ms - 130_000), ("recent", now_ms - 30_000)] {
            store
                .record_failed_attempt("site_a", Some(client), audit(ts_ms))
                .await
                .unwrap();
        }
        store.purge_expired(now_ms / 1000).await.unwrap();
        let left: Vec<String> = store
            .read_table(FAILED, |t| {
                Ok(t.iter()
                    .unwrap()
                    .map(|row| row.unwrap().0.value().to_owned())
                    .collect())
            })
            .unwrap();
        assert_eq!(left, ["site_a/recent"]);
    }

    #[test]
    fn a_checkpoint_writes_each_key_once_with_the_same_end_state() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(EVENTS)
            .unwrap()
            .insert("old", b"kept".as_slice())
            .unwrap();
        let mut p = Puts::default();
        p.put(L_USAGE, "tok", b"1");
        p.put_if_absent(L_EVENTS, "new", b"first");
        p.put(L_USAGE, "tok", b"2");
        p.put_if_absent(L_EVENTS, "new", b"second");
        p.put_if_absent(L_EVENTS, "old", b"ignored");
        p.put_if_absent(L_EVENTS, "then-put", b"ignored");
        p.put(L_EVENTS, "then-put", b"outright");
        p.put(L_AUDIT, "s/0000000000002/b", b"{}");
        p.put(L_AUDIT, "s/0000000000001/a", b"{}");
        apply_logged(&txn, 7, p.as_bytes()).unwrap();
        let value = |def: Def, key: &str| {
            let t = txn.open_table(def).unwrap();
            let v = t.get(key).unwrap().map(|v| v.value().to_vec());
            v
        };
        assert_eq!(value(USAGE, "tok").as_deref(), Some(&b"2"[..]));
        assert_eq!(value(EVENTS, "new").as_deref(), Some(&b"first"[..]));
        assert_eq!(value(EVENTS, "old").as_deref(), Some(&b"kept"[..]));
        assert_eq!(value(EVENTS, "then-put").as_deref(), Some(&b"outright"[..]));
        let block = value(AUDIT, "s/0000000000002/~0000000000000007.0").unwrap();
        assert_eq!(
            audit_records("k", &block).unwrap(),
            [
                ("s/0000000000001/a", &b"{}"[..]),
                ("s/0000000000002/b", b"{}")
            ]
        );
    }

    /// A data dir written before the indexes existed (no version), or before the
    /// plans' index (version 1), has them all built when it is opened: its listings
    /// find every record, and a plan under active tokens is not deleted.
    #[tokio::test]
    async fn a_database_from_before_the_indexes_gets_them_when_opened() {
        for version in [None, Some(&[][..])] {
            from_before_the_indexes(version).await;
        }
    }

    async fn from_before_the_indexes(version: Option<&[u8]>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let key = crate::seal::SealingKey::from_bytes(&[9; 32]);
        let (sites, tokens) = {
            let store = EmbeddedStore::open(&path).unwrap();
            let mut sites = Vec::new();
            let mut tokens = Vec::new();
            for owner in ["alice", "alice", "bob"] {
                let site = Site::new(owner, "s", "https://api.example.com", &key, 1).0;
                site_with_plan(&store, &site).await;
                for consumer in [Some("carol"), None, Some("carol/x")] {
                    let token = Token {
                        token_id: crate::ids::token_id(),
                        site_id: site.site_id.clone(),
                        plan_id: PLAN.into(),
                        token_hash: crate::ids::hash_secret(&crate::ids::consumer_token()),
                        label: None,
                        consumer: consumer.map(Into::into),
                        created_at: 1,
                        revoked_at: None,
                    };
                    store.create_token(&token).await.unwrap();
                    tokens.push(token);
                }
                sites.push(site);
            }
            (sites, tokens)
        };
        // Take the database back to how it was before the indexes (version 1 had
        // the owner and consumer indexes, built in the same step).
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        for def in INDEXES {
            assert!(txn.delete_table(def).unwrap());
        }
        let mut meta = txn.open_table(META).unwrap();
        match version {
            None => meta.remove(INDEXED).unwrap().map(drop),
            Some(v) => meta.insert(INDEXED, v).unwrap().map(drop),
        };
        drop(meta);
        txn.commit().unwrap();
        drop(db);

        let store = EmbeddedStore::open(&path).unwrap();
        let ids = |page: Page<Site>| {
            page.items
                .into_iter()
                .map(|s| s.site_id)
                .collect::<Vec<_>>()
        };
        let mut alices = vec![sites[0].site_id.clone(), sites[1].site_id.clone()];
        alices.sort();
        let listed = store
            .list_sites_page(Some("alice"), 10, None)
            .await
            .unwrap();
        assert_eq!(ids(listed), alices);
        let listed = store.list_sites_page(Some("bob"), 10, None).await.unwrap();
        assert_eq!(ids(listed), [sites[2].site_id.clone()]);
        let mut carols: Vec<Token> = tokens
            .into_iter()
            .filter(|t| t.consumer.as_deref() == Some("carol"))
            .collect();
        carols.sort_by(|a, b| a.token_id.cmp(&b.token_id));
        let listed = store.list_consumer_tokens_page("carol", 10, None).await;
        assert_eq!(listed.unwrap().items, carols);
        for site in &sites {
            let deleted = store.delete_plan(&site.site_id, PLAN).await.unwrap();
            assert_eq!(deleted, PlanDeletion::InUse(3), "{version:?}");
        }
    }
}
