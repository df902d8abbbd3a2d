//! The DynamoDB store: one table, keys `pk`/`sk`, two GSIs, TTL on `expires_at`.
//! The access patterns and partition maths are in `docs/dynamodb.md`.
//!
//! Hot path: one conditional `UpdateItem` on the token's usage item checks that the
//! token exists and is not revoked, the monthly quota and the sliding window, and
//! counts the request; on a failed condition `ReturnValuesOnConditionCheckFailure =
//! ALL_OLD` says why, without a second read. The site's per-second counter is
//! updated concurrently; audit records are written off the request path by a
//! batching writer that retries until they are stored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, Put, PutRequest, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableStatus, TimeToLiveSpecification,
    TransactWriteItem, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, Notify};

use super::*;
use crate::limits::{
    self, period_of, QuotaCounter, SecondWindow, SlidingWindow, Verdict, MINUTE_MS,
};

type Item = HashMap<String, AttributeValue>;

pub const GSI1: &str = "gsi1";
pub const GSI2: &str = "gsi2";
pub const TTL_ATTRIBUTE: &str = "expires_at";
/// A plan item's count of the active tokens on the plan, kept by the token writes'
/// transactions; a plan is deleted only while it is zero.
const ACTIVE_TOKENS: &str = "active_tokens";
/// Audit records of one site are spread over this many partitions.
pub const AUDIT_SHARDS: u32 = 8;
/// One site-rate counter item takes at most this many writes a second.
const SITE_RATE_PER_SHARD: u64 = 500;
const AUDIT_QUEUE: usize = 10_000;
const AUDIT_BATCH: usize = 25;
const AUDIT_WRITERS: usize = 4;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn sdk<E, R>(e: SdkError<E, R>) -> StoreError
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    StoreError::Unavailable(DisplayErrorContext(e).to_string())
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl std::fmt::Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn get_s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

fn get_n(item: &Item, name: &str) -> Option<u64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .map(|v| v.max(0) as u64)
}

fn data<T: DeserializeOwned>(item: &Item) -> Result<T> {
    let d = get_s(item, "d").ok_or_else(|| StoreError::Corrupt("item without d".into()))?;
    serde_json::from_str(d).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn with_data<T: Serialize>(mut item: Item, v: &T) -> Item {
    item.insert("d".into(), data_value(v));
    item
}

/// A record as an item's `d`.
fn data_value<T: Serialize>(v: &T) -> AttributeValue {
    s(serde_json::to_string(v).expect("records serialise"))
}

fn key(pk: impl Into<String>, sk: impl Into<String>) -> Item {
    HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
}

/// The key of a site's quota event: one per token, month (`yyyymm`) and kind.
fn event_key(site_id: &str, token_id: &str, period: u32, kind: &str) -> Item {
    key(
        format!("SITE#{site_id}"),
        format!("EVENT#{token_id}#{period}#{kind}"),
    )
}

/// The sliding window held in an item's `m_{minute}` counters, at `minute`.
fn window_from(item: &Item, minute: u64) -> SlidingWindow {
    SlidingWindow {
        minute,
        current: get_n(item, &format!("m_{minute}")).unwrap_or(0),
        previous: get_n(item, &format!("m_{}", minute - 1)).unwrap_or(0),
    }
}

/// A token's usage at `now_ms` from its usage item (none: no use yet).
fn usage_from(item: Option<&Item>, now_ms: u64) -> TokenUsage {
    let empty = Item::new();
    let item = item.unwrap_or(&empty);
    let period = period_of(now_ms);
    TokenUsage {
        window: window_from(item, now_ms / MINUTE_MS),
        quota: QuotaCounter {
            period,
            used: get_n(item, &format!("q_{period}")).unwrap_or(0),
        },
    }
}

fn prev_period(p: u32) -> u32 {
    if p % 100 == 1 {
        (p / 100 - 1) * 100 + 12
    } else {
        p - 1
    }
}

fn audit_pk(site_id: &str, id: &str) -> String {
    let shard = id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
        % AUDIT_SHARDS;
    format!("AUDIT#{site_id}#{shard}")
}

fn audit_sk(r: &AuditRecord) -> String {
    format!("{:013}#{}", r.ts_ms, r.id)
}

fn audit_item(r: &AuditRecord) -> Item {
    let mut item = key(audit_pk(&r.site_id, &r.id), audit_sk(r));
    item.insert(TTL_ATTRIBUTE.into(), n(r.expires_at));
    with_data(item, r)
}

/// Audit records waiting for the background writer, so a process can read its
/// own writes.
#[derive(Default)]
struct Pending {
    count: AtomicUsize,
    drained: Notify,
}

impl Pending {
    fn done(&self, k: usize) {
        if self.count.fetch_sub(k, Ordering::AcqRel) == k {
            self.drained.notify_waiters();
        }
    }

    async fn wait(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.count.load(Ordering::Acquire) > 0 {
            let notified = self.drained.notified();
            if self.count.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
    }
}

/// The DynamoDB store. Cheap to clone; build it once per process.
#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: Arc<str>,
    /// token id -> (minute, final count of that minute), learned from responses.
    previous_minute: Arc<Mutex<HashMap<String, (u64, u64)>>>,
    audit: mpsc::Sender<AuditRecord>,
    pending: Arc<Pending>,
}

impl DynamoStore {
    /// A client from the SDK's standard environment (`AWS_REGION`, credentials,
    /// `AWS_ENDPOINT_URL_DYNAMODB` / `AWS_ENDPOINT_URL`), with bounded retries and
    /// timeouts, so a failing DynamoDB makes decisions fail closed quickly.
    pub async fn from_env(table: &str) -> Self {
        Self::connect(table, None).await
    }

    /// As [`Self::from_env`], with an explicit endpoint (tests put a counting proxy
    /// in front of the server).
    pub async fn connect(table: &str, endpoint: Option<&str>) -> Self {
        let loader = crate::aws::loader(endpoint);
        // Bounded retries and time: beyond them a decision fails closed (503).
        let ms = |var: &'static str, default: u64| {
            Duration::from_millis(crate::config::env_parse(var, default).unwrap_or(default))
        };
        let config = loader
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(3))
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(1))
                    .operation_attempt_timeout(ms("PAYFENCE_DYNAMODB_ATTEMPT_TIMEOUT_MS", 1_000))
                    .operation_timeout(ms("PAYFENCE_DYNAMODB_TIMEOUT_MS", 3_000))
                    .build(),
            )
            .load()
            .await;
        Self::new(Client::new(&config), table)
    }

    pub fn new(client: Client, table: &str) -> Self {
        let pending = Arc::new(Pending::default());
        let audit = spawn_audit_writer(client.clone(), table.into(), pending.clone());
        Self {
            client,
            table: table.into(),
            previous_minute: Arc::default(),
            audit,
            pending,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Create the table with the documented schema if it does not exist (the local
    /// server does this; in AWS the SAM template owns the table).
    pub async fn ensure_table(&self) -> Result<()> {
        match self
            .client
            .describe_table()
            .table_name(&*self.table)
            .send()
            .await
        {
            Ok(_) => return Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) => {}
            Err(e) => return Err(sdk(e)),
        }
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(unavailable)
        };
        let schema = |hash: &str, range: &str| -> Result<Vec<KeySchemaElement>> {
            Ok(vec![
                KeySchemaElement::builder()
                    .attribute_name(hash)
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(unavailable)?,
                KeySchemaElement::builder()
                    .attribute_name(range)
                    .key_type(KeyType::Range)
                    .build()
                    .map_err(unavailable)?,
            ])
        };
        let gsi = |name: &str, hash: &str, range: &str| -> Result<GlobalSecondaryIndex> {
            GlobalSecondaryIndex::builder()
                .index_name(name)
                .set_key_schema(Some(schema(hash, range)?))
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::All)
                        .build(),
                )
                .build()
                .map_err(unavailable)
        };
        let created = self
            .client
            .create_table()
            .table_name(&*self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .set_attribute_definitions(Some(vec![
                attr("pk")?,
                attr("sk")?,
                attr("gsi1pk")?,
                attr("gsi1sk")?,
                attr("gsi2pk")?,
                attr("gsi2sk")?,
            ]))
            .set_key_schema(Some(schema("pk", "sk")?))
            .global_secondary_indexes(gsi(GSI1, "gsi1pk", "gsi1sk")?)
            .global_secondary_indexes(gsi(GSI2, "gsi2pk", "gsi2sk")?)
            .send()
            .await;
        if let Err(e) = created {
            // Another process may have created it meanwhile.
            if !e
                .as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception())
            {
                return Err(sdk(e));
            }
        }
        for _ in 0..120 {
            let t = self
                .client
                .describe_table()
                .table_name(&*self.table)
                .send()
                .await
                .map_err(sdk)?;
            if t.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.client
            .update_time_to_live()
            .table_name(&*self.table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name(TTL_ATTRIBUTE)
                    .build()
                    .map_err(unavailable)?,
            )
            .send()
            .await
            .map_err(sdk)?;
        Ok(())
    }

    async fn get_item(&self, key: Item, consistent: bool) -> Result<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .set_key(Some(key))
            .consistent_read(consistent)
            .send()
            .await
            .map_err(sdk)?;
        Ok(out.item)
    }

    async fn put_item(&self, item: Item) -> Result<()> {
        self.client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(sdk)?;
        Ok(())
    }

    /// Delete the item at `key`; whether there was one.
    async fn delete(&self, key: Item) -> Result<bool> {
        let old = self
            .client
            .delete_item()
            .table_name(&*self.table)
            .set_key(Some(key))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
            .send()
            .await
            .map_err(sdk)?;
        Ok(old.attributes.is_some_and(|a| !a.is_empty()))
    }

    /// A query of the site's quota events, in key order ([`event_key`]).
    fn events_query(&self, site_id: &str) -> QueryFluentBuilder {
        (self.client.query())
            .table_name(&*self.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :p)")
            .expression_attribute_values(":pk", s(format!("SITE#{site_id}")))
            .expression_attribute_values(":p", s("EVENT#"))
    }

    /// Delete the items of `keys` with `BatchWriteItem`, 25 a call; those DynamoDB
    /// leaves unprocessed (throttling) are sent again, with backoff, a few times.
    async fn delete_all(&self, keys: Vec<Item>) -> Result<()> {
        use aws_sdk_dynamodb::types::DeleteRequest;
        for chunk in keys.chunks(25) {
            let mut requests = Vec::with_capacity(chunk.len());
            for k in chunk {
                let delete = DeleteRequest::builder().set_key(Some(k.clone()));
                let delete = delete.build().map_err(unavailable)?;
                requests.push(WriteRequest::builder().delete_request(delete).build());
            }
            let mut backoff = Duration::from_millis(20);
            for attempt in 0.. {
                let out = (self.client.batch_write_item())
                    .request_items(&*self.table, requests)
                    .send()
                    .await
                    .map_err(sdk)?;
                requests = (out.unprocessed_items)
                    .and_then(|mut m| m.remove(&*self.table))
                    .unwrap_or_default();
                if requests.is_empty() {
                    break;
                }
                if attempt == 4 {
                    return Err(unavailable("deletes left unprocessed (throttled)"));
                }
                back_off(&mut backoff).await;
            }
        }
        Ok(())
    }

    /// Put `item` if `condition` holds (`:read` bound to `read`, when given);
    /// `refused` otherwise.
    async fn put_if(
        &self,
        item: Item,
        condition: &str,
        values: Option<Item>,
        refused: StoreError,
    ) -> Result<()> {
        match self
            .client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(item))
            .condition_expression(condition)
            .set_expression_attribute_values(values)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Err(refused)
            }
            Err(e) => Err(sdk(e)),
        }
    }

    /// Replace the item at `record` with `now(stored item)` if its record is still
    /// `was`; otherwise `Changed(id)`. The put is conditional on the `d` exactly as
    /// read, so a revocation or another change meanwhile is never written over.
    async fn put_over<T: DeserializeOwned + PartialEq>(
        &self,
        record: Item,
        was: &T,
        id: &str,
        now: impl FnOnce(Item) -> Item,
    ) -> Result<()> {
        let stored = self.read_as(record, was, id).await?;
        let changed = StoreError::Changed(id.to_owned());
        let read = Item::from([(":was".into(), stored["d"].clone())]);
        self.put_if(now(stored), "d = :was", Some(read), changed)
            .await
    }

    /// The item at `record` (strongly consistent) if its record is `was`;
    /// otherwise `Changed(id)`.
    async fn read_as<T: DeserializeOwned + PartialEq>(
        &self,
        record: Item,
        was: &T,
        id: &str,
    ) -> Result<Item> {
        match self.get_item(record, true).await? {
            Some(stored) if data::<T>(&stored)? == *was => Ok(stored),
            _ => Err(StoreError::Changed(id.to_owned())),
        }
    }

    /// Apply `items` in one transaction. Cancelled by failed conditions, it gives
    /// which items' conditions failed, in their order. Cancelled because another
    /// transaction held one of the items (or by throttling), it is sent again with
    /// backoff, up to 8 times in all.
    async fn transact(&self, items: Vec<TransactWriteItem>) -> Result<Result<(), Vec<bool>>> {
        use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
        let mut backoff = Duration::from_millis(20);
        for attempt in 0.. {
            let sent = (self.client.transact_write_items())
                .set_transact_items(Some(items.clone()))
                .send()
                .await;
            let e = match sent {
                Ok(_) => return Ok(Ok(())),
                Err(e) => e,
            };
            let Some(TransactWriteItemsError::TransactionCanceledException(c)) =
                e.as_service_error()
            else {
                return Err(sdk(e));
            };
            let codes: Vec<&str> = (c.cancellation_reasons().iter())
                .map(|r| r.code().unwrap_or("None"))
                .collect();
            if codes.contains(&"ConditionalCheckFailed") {
                return Ok(Err(codes
                    .iter()
                    .map(|c| *c == "ConditionalCheckFailed")
                    .collect()));
            }
            let contended = |c: &&str| {
                matches!(
                    *c,
                    "None"
                        | "TransactionConflict"
                        | "ThrottlingError"
                        | "ProvisionedThroughputExceeded"
                        | "RequestLimitExceeded"
                )
            };
            if codes.is_empty() || !codes.iter().all(contended) || attempt == 7 {
                return Err(sdk(e));
            }
            back_off(&mut backoff).await;
        }
        unreachable!("the loop returns")
    }

    /// A transaction item putting `item` if `condition` holds (with `values`).
    fn put_in_transaction(
        &self,
        item: Item,
        condition: &str,
        values: Option<Item>,
    ) -> Result<TransactWriteItem> {
        let put = Put::builder()
            .table_name(&*self.table)
            .set_item(Some(item))
            .condition_expression(condition)
            .set_expression_attribute_values(values)
            .build()
            .map_err(unavailable)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// A transaction item adding `by` to the count of active tokens on a plan, on
    /// the condition that the plan exists and, to take a token off, that its count
    /// is above zero: a plan written before plans counted their tokens has no
    /// count, and its older tokens leaving it do not drive one below zero.
    fn count_on_plan(&self, site_id: &str, plan_id: &str, by: i64) -> Result<TransactWriteItem> {
        let mut values = Item::from([(":by".into(), n(by))]);
        let condition = if by < 0 {
            values.insert(":zero".into(), n(0));
            "attribute_exists(pk) AND #n > :zero"
        } else {
            "attribute_exists(pk)"
        };
        let update = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&*self.table)
            .set_key(Some(plan_key(site_id, plan_id)))
            .update_expression("ADD #n :by")
            .condition_expression(condition)
            .expression_attribute_names("#n", ACTIVE_TOKENS)
            .set_expression_attribute_values(Some(values))
            .build()
            .map_err(unavailable)?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    /// Put only if no item has this key; `Conflict` otherwise.
    async fn put_new(&self, item: Item, what: &str) -> Result<()> {
        let refused = StoreError::Conflict(what.into());
        self.put_if(item, "attribute_not_exists(pk)", None, refused)
            .await
    }

    /// Put `item` (of revision `read_at + 1`, in `rev`) only over the item of revision
    /// `read_at`; `Changed` otherwise. Items written before revisions existed have no
    /// `rev`: revision 0.
    async fn put_at_revision(&self, item: Item, read_at: u64, what: &str) -> Result<()> {
        let refused = StoreError::Changed(what.into());
        let read = Item::from([(":read".into(), n(read_at))]);
        self.put_if(item, at_revision(read_at), Some(read), refused)
            .await
    }

    /// Every item of a query (all pages).
    async fn query_all(
        &self,
        index: Option<&str>,
        pk_name: &str,
        pk: &str,
        sk_prefix: Option<(&str, &str)>,
    ) -> Result<Vec<Item>> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let mut q = self
                .client
                .query()
                .table_name(&*self.table)
                .set_index_name(index.map(Into::into))
                .expression_attribute_names("#pk", pk_name)
                .expression_attribute_values(":pk", s(pk))
                .set_exclusive_start_key(start.take());
            q = match sk_prefix {
                Some((sk_name, prefix)) => q
                    .key_condition_expression("#pk = :pk AND begins_with(#sk, :p)")
                    .expression_attribute_names("#sk", sk_name)
                    .expression_attribute_values(":p", s(prefix)),
                None => q.key_condition_expression("#pk = :pk"),
            };
            let page = q.send().await.map_err(sdk)?;
            out.extend(page.items.unwrap_or_default());
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(out),
            }
        }
    }

    /// The `d` of up to `n` items of query `q`, after the key `start` when given:
    /// a page of at most `n - 1`, read one further to know whether more follow.
    async fn query_up_to<T: DeserializeOwned>(
        &self,
        q: QueryFluentBuilder,
        n: usize,
        mut start: Option<Item>,
    ) -> Result<Vec<T>> {
        let mut items = Vec::new();
        while items.len() < n {
            let page = q
                .clone()
                .limit((n - items.len()).try_into().unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk)?;
            for item in page.items.unwrap_or_default() {
                items.push(data(&item)?);
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        Ok(items)
    }

    /// Rewrite the `d` of an existing item by read-modify-write; `change` may give
    /// the item an `expires_at` (for TTL) too.
    async fn update_data<T: Serialize + DeserializeOwned>(
        &self,
        key_item: Item,
        change: impl FnOnce(&mut T) -> Option<u64>,
    ) -> Result<Option<(Item, T)>> {
        let Some(item) = self.get_item(key_item, true).await? else {
            return Ok(None);
        };
        let mut v: T = data(&item)?;
        let expires_at = change(&mut v);
        let mut item = with_data(item, &v);
        if let Some(at) = expires_at {
            item.insert(TTL_ATTRIBUTE.into(), n(at));
        }
        self.put_item(item.clone()).await?;
        Ok(Some((item, v)))
    }

    fn cached_previous(&self, token_id: &str, minute: u64) -> Option<u64> {
        self.previous_minute
            .lock()
            .unwrap()
            .get(token_id)
            .filter(|(m, _)| *m == minute)
            .map(|(_, c)| *c)
    }

    fn learn_previous(&self, token_id: &str, minute: u64, count: u64) {
        let mut cache = self.previous_minute.lock().unwrap();
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(token_id.to_owned(), (minute, count));
    }

    /// The single conditional UpdateItem of the hot path (retried only when this
    /// process's guess of the previous minute's final count was wrong).
    async fn count_token(&self, req: &CountRequest) -> Result<Counted> {
        let now = req.now_ms;
        let minute = now / MINUTE_MS;
        let period = period_of(now);
        let (m_cur, m_prev) = (format!("m_{minute}"), format!("m_{}", minute - 1));
        let q_cur = format!("q_{period}");
        let usage_key = key(format!("TOKEN#{}", req.token_id), "USAGE");
        for _ in 0..3 {
            let guess = self.cached_previous(&req.token_id, minute - 1).unwrap_or(0);
            let elapsed = now % MINUTE_MS;
            let weighted = guess * (MINUTE_MS - elapsed) / MINUTE_MS;
            let threshold = req.limits.requests_per_minute.saturating_sub(weighted);
            let rate_cond = if threshold == 0 {
                "attribute_not_exists(pk)" // cannot hold: the window is full
            } else {
                "(attribute_not_exists(#mc) OR #mc < :thr)"
            };
            let prev_cond = if guess == 0 {
                "(attribute_not_exists(#mp) OR #mp = :zero)"
            } else {
                "#mp = :pg"
            };
            let condition = format!(
                "attribute_exists(pk) AND attribute_not_exists(revoked_at) AND (attribute_not_exists(#q) OR #q < :quota) AND {rate_cond} AND {prev_cond}"
            );
            let mut update = self
                .client
                .update_item()
                .table_name(&*self.table)
                .set_key(Some(usage_key.clone()))
                .update_expression("ADD #mc :one, #q :one REMOVE #m2, #m3, #q1")
                .condition_expression(condition)
                .expression_attribute_names("#mc", &m_cur)
                .expression_attribute_names("#mp", &m_prev)
                .expression_attribute_names("#m2", format!("m_{}", minute - 2))
                .expression_attribute_names("#m3", format!("m_{}", minute - 3))
                .expression_attribute_names("#q", &q_cur)
                .expression_attribute_names("#q1", format!("q_{}", prev_period(period)))
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":quota", n(req.limits.monthly_quota))
                .return_values(ReturnValue::AllNew)
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                );
            if threshold > 0 {
                update = update.expression_attribute_values(":thr", n(threshold));
            }
            update = if guess == 0 {
                update.expression_attribute_values(":zero", n(0))
            } else {
                update.expression_attribute_values(":pg", n(guess))
            };
            let state = |item: &Item, less: u64| limits::TokenUsage {
                window: {
                    let w = window_from(item, minute);
                    SlidingWindow {
                        current: w.current.saturating_sub(less),
                        ..w
                    }
                },
                quota: QuotaCounter {
                    period,
                    used: get_n(item, &q_cur).unwrap_or(0).saturating_sub(less),
                },
            };
            let evaluate =
                |usage| limits::evaluate(usage, SecondWindow::default(), req.limits, u64::MAX, now);
            match update.send().await {
                Ok(out) => {
                    let item = out.attributes.unwrap_or_default();
                    let before = state(&item, 1);
                    self.learn_previous(&req.token_id, minute - 1, before.window.previous);
                    let mut eval = evaluate(before);
                    // Counted by the condition: report it as allowed whatever rounding says.
                    eval.verdict = Verdict::Allow;
                    eval.retry_after_secs = None;
                    return Ok(Counted::Evaluated(eval));
                }
                Err(e) => {
                    let failed = match e {
                        SdkError::ServiceError(se) => match se.into_err() {
                            UpdateItemError::ConditionalCheckFailedException(c) => c.item,
                            other => return Err(unavailable(DisplayErrorContext(other))),
                        },
                        other => return Err(sdk(other)),
                    };
                    // Emulators may not return ALL_OLD: read it then.
                    let old = match failed {
                        Some(item) => Some(item),
                        None => self.get_item(usage_key.clone(), true).await?,
                    };
                    let Some(old) = old else {
                        return Ok(Counted::Revoked);
                    };
                    if old.contains_key("revoked_at") {
                        return Ok(Counted::Revoked);
                    }
                    let before = state(&old, 0);
                    self.learn_previous(&req.token_id, minute - 1, before.window.previous);
                    let eval = evaluate(before);
                    if eval.verdict != Verdict::Allow {
                        return Ok(Counted::Evaluated(eval));
                    }
                    // Our guess of the previous minute was stale: try again with the truth.
                }
            }
        }
        Err(unavailable("usage update kept conflicting"))
    }

    /// Count one request against the site's per-second limit (sharded counter);
    /// whether it was within the limit, and the counter item it was counted on.
    async fn count_site(&self, site_id: &str, limit: u64, now_ms: u64) -> Result<(bool, Item)> {
        let shards = limit.div_ceil(SITE_RATE_PER_SHARD).clamp(1, 64);
        let per_shard = limit.div_ceil(shards);
        let shard = rand::random::<u64>() % shards;
        let second = now_ms / 1000;
        let counter = key(format!("SITE#{site_id}"), format!("RATE#{second}#{shard}"));
        let res = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(counter.clone()))
            .update_expression("ADD c :one SET expires_at = :exp")
            .condition_expression("attribute_not_exists(c) OR c < :lim")
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":lim", n(per_shard))
            .expression_attribute_values(":exp", n(second + 3600))
            .send()
            .await;
        match res {
            Ok(_) => Ok((true, counter)),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok((false, counter))
            }
            Err(e) => Err(sdk(e)),
        }
    }

    /// Undo one count (a request denied by the other of the two concurrent checks).
    fn uncount(&self, key_item: Item, names: Vec<String>) {
        let client = self.client.clone();
        let table = self.table.clone();
        tokio::spawn(async move {
            let expr = names
                .iter()
                .enumerate()
                .map(|(i, _)| format!("#a{i} :minus"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut u = client
                .update_item()
                .table_name(&*table)
                .set_key(Some(key_item))
                .update_expression(format!("ADD {expr}"))
                .condition_expression("attribute_exists(pk)")
                .expression_attribute_values(":minus", n(-1i64));
            for (i, name) in names.iter().enumerate() {
                u = u.expression_attribute_names(format!("#a{i}"), name);
            }
            if let Err(e) = u.send().await {
                tracing::warn!(error = %DisplayErrorContext(e), "could not undo a count");
            }
        });
    }

    async fn record_events(&self, req: &CountRequest, eval: &limits::Evaluation) -> Result<()> {
        for kind in &eval.events {
            let event = req.quota_event(eval, *kind);
            let at = event_key(&req.site_id, &req.token_id, event.period, kind.as_str());
            let item = with_data(at, &event);
            match self.put_new(item, "event").await {
                Ok(()) | Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn enqueue_audit(&self, record: AuditRecord) -> Result<()> {
        self.pending.count.fetch_add(1, Ordering::AcqRel);
        if self.audit.send(record).await.is_err() {
            self.pending.done(1);
            return Err(unavailable("audit writer stopped"));
        }
        Ok(())
    }
}

/// The background audit writer: batches of up to 25 records, up to four batches in
/// flight, each retried with exponential backoff and jitter until stored. Memory is
/// bounded by the queue; a full queue makes callers wait.
fn spawn_audit_writer(
    client: Client,
    table: Arc<str>,
    pending: Arc<Pending>,
) -> mpsc::Sender<AuditRecord> {
    let (tx, mut rx) = mpsc::channel::<AuditRecord>(AUDIT_QUEUE);
    tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(AUDIT_WRITERS));
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < AUDIT_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let (client, table, pending) = (client.clone(), table.clone(), pending.clone());
            tokio::spawn(async move {
                let k = batch.len();
                write_audit_batch(&client, &table, batch).await;
                pending.done(k);
                drop(slot);
            });
        }
    });
    tx
}

/// The condition that an item is still at revision `:read` (`read_at`).
fn at_revision(read_at: u64) -> &'static str {
    if read_at == 0 {
        "attribute_exists(pk) AND (attribute_not_exists(rev) OR rev = :read)"
    } else {
        "rev = :read"
    }
}

/// Wait `backoff` and up to half as long again (jitter), then double it, up to 5 s.
async fn back_off(backoff: &mut Duration) {
    let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1);
    tokio::time::sleep(*backoff + Duration::from_millis(jitter)).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}

async fn write_audit_batch(client: &Client, table: &str, batch: Vec<AuditRecord>) {
    let mut requests: Vec<WriteRequest> = batch
        .iter()
        .filter_map(|r| {
            let put = PutRequest::builder()
                .set_item(Some(audit_item(r)))
                .build()
                .ok()?;
            Some(WriteRequest::builder().put_request(put).build())
        })
        .collect();
    let mut backoff = Duration::from_millis(50);
    while !requests.is_empty() {
        let res = client
            .batch_write_item()
            .request_items(table, requests.clone())
            .send()
            .await;
        match res {
            Ok(out) => {
                requests = out
                    .unprocessed_items
                    .and_then(|mut m| m.remove(table))
                    .unwrap_or_default();
                if requests.is_empty() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %DisplayErrorContext(e), records = requests.len(), "audit write failed; retrying")
            }
        }
        back_off(&mut backoff).await;
    }
}

#[async_trait]
impl SiteStore for DynamoStore {
    async fn create_site(&self, site: &Site) -> Result<()> {
        self.put_new(site_item(site), &site.site_id).await
    }
    async fn update_site(&self, site: &Site) -> Result<()> {
        let next = Site {
            revision: site.revision + 1,
            ..site.clone()
        };
        self.put_at_revision(site_item(&next), site.revision, &site.site_id)
            .await
    }
    async fn delete_site(&self, site_id: &str) -> Result<bool> {
        // What only the site holds goes first, so a failure leaves the site for a
        // retry: its quota events, a page at a time (its counters expire by TTL).
        loop {
            let page = self
                .events_query(site_id)
                .projection_expression("pk, sk")
                .consistent_read(true)
                .limit(1000)
                .send()
                .await
                .map_err(sdk)?;
            match page.items {
                Some(keys) if !keys.is_empty() => self.delete_all(keys).await?,
                _ => break,
            }
        }
        self.delete(key(format!("SITE#{site_id}"), "SITE")).await
    }
    async fn get_site(&self, site_id: &str) -> Result<Option<Site>> {
        self.get_item(key(format!("SITE#{site_id}"), "SITE"), true)
            .await?
            .map(|i| data(&i))
            .transpose()
    }
    async fn list_sites_page(
        &self,
        owner: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<Site>> {
        let (index, partition) = match owner {
            Some(o) => ((GSI1, "gsi1pk", "gsi1sk"), format!("OWNER#{o}")),
            // Admin listing: every site is in one gsi2 partition (a scan would read
            // every item of the table, audit records included).
            None => ((GSI2, "gsi2pk", "gsi2sk"), "SITES".to_owned()),
        };
        let start = after.map(|id| key(format!("SITE#{id}"), "SITE"));
        self.index_page(index, partition, "SITE#", limit, start, |s: &Site| {
            s.site_id.clone()
        })
        .await
    }
}

#[async_trait]
impl PlanStore for DynamoStore {
    async fn create_plan(&self, plan: &Plan) -> Result<()> {
        let mut item = plan_item(plan);
        item.insert(ACTIVE_TOKENS.into(), n(0));
        self.put_new(item, &plan.plan_id).await
    }
    async fn update_plan(&self, plan: &Plan) -> Result<()> {
        let next = Plan {
            revision: plan.revision + 1,
            ..plan.clone()
        };
        // An update, not a put: the plan's count of active tokens stays as it is.
        let updated = (self.client.update_item())
            .table_name(&*self.table)
            .set_key(Some(plan_key(&plan.site_id, &plan.plan_id)))
            .update_expression("SET d = :d, rev = :rev")
            .condition_expression(at_revision(plan.revision))
            .expression_attribute_values(":d", data_value(&next))
            .expression_attribute_values(":rev", n(next.revision))
            .expression_attribute_values(":read", n(plan.revision))
            .send()
            .await;
        match updated {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Err(StoreError::Changed(plan.plan_id.clone()))
            }
            Err(e) => Err(sdk(e)),
        }
    }
    async fn delete_plan(&self, site_id: &str, plan_id: &str) -> Result<PlanDeletion> {
        // Conditional on the count the token transactions keep: a plan written
        // before plans counted their tokens has none, and is deleted.
        let deleted = (self.client.delete_item())
            .table_name(&*self.table)
            .set_key(Some(plan_key(site_id, plan_id)))
            .condition_expression("attribute_not_exists(#n) OR #n <= :zero")
            .expression_attribute_names("#n", ACTIVE_TOKENS)
            .expression_attribute_values(":zero", n(0))
            .return_values(ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match deleted {
            Ok(old) if old.attributes().is_some_and(|a| !a.is_empty()) => Ok(PlanDeletion::Deleted),
            Ok(_) => Ok(PlanDeletion::NotFound),
            Err(e) => match e.as_service_error() {
                Some(DeleteItemError::ConditionalCheckFailedException(c)) => {
                    let active = c.item().and_then(|i| get_n(i, ACTIVE_TOKENS));
                    Ok(PlanDeletion::InUse(active.unwrap_or(1)))
                }
                _ => Err(sdk(e)),
            },
        }
    }
    async fn get_plan(&self, site_id: &str, plan_id: &str) -> Result<Option<Plan>> {
        self.get_item(plan_key(site_id, plan_id), true)
            .await?
            .map(|i| data(&i))
            .transpose()
    }
    async fn list_plans(&self, site_id: &str) -> Result<Vec<Plan>> {
        self.query_all(
            None,
            "pk",
            &format!("SITE#{site_id}"),
            Some(("sk", "PLAN#")),
        )
        .await?
        .iter()
        .map(data)
        .collect()
    }
}

fn site_item(site: &Site) -> Item {
    let mut item = key(format!("SITE#{}", site.site_id), "SITE");
    item.insert("gsi1pk".into(), s(format!("OWNER#{}", site.owner)));
    item.insert("gsi1sk".into(), s(format!("SITE#{}", site.site_id)));
    item.insert("gsi2pk".into(), s("SITES"));
    item.insert("gsi2sk".into(), s(format!("SITE#{}", site.site_id)));
    item.insert("rev".into(), n(site.revision));
    with_data(item, site)
}

fn plan_key(site_id: &str, plan_id: &str) -> Item {
    key(format!("SITE#{site_id}"), format!("PLAN#{plan_id}"))
}

fn plan_item(plan: &Plan) -> Item {
    let mut item = plan_key(&plan.site_id, &plan.plan_id);
    item.insert("rev".into(), n(plan.revision));
    with_data(item, plan)
}

fn token_item(t: &Token) -> Item {
    let mut item = key(format!("TOKEN#{}", t.token_id), "TOKEN");
    item.insert("gsi1pk".into(), s(format!("SITE#{}#TOKENS", t.site_id)));
    item.insert("gsi1sk".into(), s(format!("TOKEN#{}", t.token_id)));
    if let Some(c) = &t.consumer {
        item.insert("gsi2pk".into(), s(format!("CONSUMER#{c}")));
        item.insert("gsi2sk".into(), s(format!("TOKEN#{}", t.token_id)));
    }
    with_data(item, t)
}

impl DynamoStore {
    /// A page of the tokens in one partition of a token index (`(name, partition
    /// key, sort key)`), whose sort key is `TOKEN#{token_id}`: in token-id order.
    async fn tokens_page(
        &self,
        index: (&str, &str, &str),
        partition: String,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<Token>> {
        let start = after.map(|id| key(format!("TOKEN#{id}"), "TOKEN"));
        self.index_page(index, partition, "TOKEN#", limit, start, |t: &Token| {
            t.token_id.clone()
        })
        .await
    }

    /// A page of the records in one partition of an index (`(name, partition key,
    /// sort key)`) whose sort keys are `{prefix}{id}`, in id order, from after the
    /// record whose table key is `start` (its `pk` is `{prefix}{id}` too).
    async fn index_page<T: DeserializeOwned>(
        &self,
        (index, pk, sk): (&str, &str, &str),
        partition: String,
        prefix: &str,
        limit: usize,
        start: Option<Item>,
        id: impl Fn(&T) -> String,
    ) -> Result<Page<T>> {
        let start = start.map(|mut k| {
            let sort = k["pk"].clone();
            k.insert(pk.into(), s(&partition));
            k.insert(sk.into(), sort);
            k
        });
        let q = self
            .client
            .query()
            .table_name(&*self.table)
            .index_name(index)
            .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
            .expression_attribute_names("#pk", pk)
            .expression_attribute_names("#sk", sk)
            .expression_attribute_values(":pk", s(&partition))
            .expression_attribute_values(":prefix", s(prefix));
        let items = self.query_up_to(q, limit + 1, start).await?;
        Ok(page_of(items, limit, id))
    }
}

#[async_trait]
impl TokenStore for DynamoStore {
    async fn create_token(&self, token: &Token) -> Result<()> {
        let mut hash = key(format!("TOKENHASH#{}", token.token_hash), "TOKENHASH");
        hash.insert("token_id".into(), s(&token.token_id));
        hash.insert("site_id".into(), s(&token.site_id));
        let mut usage = key(format!("TOKEN#{}", token.token_id), "USAGE");
        usage.insert("site_id".into(), s(&token.site_id));
        let new = |item: Item| self.put_in_transaction(item, "attribute_not_exists(pk)", None);
        let items = vec![
            new(hash)?,
            new(token_item(token))?,
            new(usage)?,
            self.count_on_plan(&token.site_id, &token.plan_id, 1)?,
        ];
        match self.transact(items).await? {
            Ok(()) => Ok(()),
            Err(failed) if failed.get(3) == Some(&true) => Err(StoreError::Missing("plan".into())),
            Err(_) => Err(StoreError::Conflict("token".into())),
        }
    }
    async fn get_token(&self, site_id: &str, token_id: &str) -> Result<Option<Token>> {
        let t: Option<Token> = self
            .get_item(key(format!("TOKEN#{token_id}"), "TOKEN"), true)
            .await?
            .map(|i| data(&i))
            .transpose()?;
        Ok(t.filter(|t| t.site_id == site_id))
    }
    async fn token_by_hash(&self, token_hash: &str) -> Result<Option<Token>> {
        let Some(h) = self
            .get_item(key(format!("TOKENHASH#{token_hash}"), "TOKENHASH"), false)
            .await?
        else {
            return Ok(None);
        };
        let (Some(token_id), Some(site_id)) = (get_s(&h, "token_id"), get_s(&h, "site_id")) else {
            return Err(StoreError::Corrupt("token hash item".into()));
        };
        self.get_token(site_id, token_id).await
    }
    async fn list_tokens_page(
        &self,
        site_id: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<Token>> {
        let index = (GSI1, "gsi1pk", "gsi1sk");
        self.tokens_page(index, format!("SITE#{site_id}#TOKENS"), limit, after)
            .await
    }
    async fn list_consumer_tokens_page(
        &self,
        consumer: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<Token>> {
        let index = (GSI2, "gsi2pk", "gsi2sk");
        self.tokens_page(index, format!("CONSUMER#{consumer}"), limit, after)
            .await
    }
    async fn update_token(&self, was: &Token, now: &Token) -> Result<()> {
        let record = key(format!("TOKEN#{}", was.token_id), "TOKEN");
        let stored = self.read_as(record, was, &was.token_id).await?;
        self.write_token(stored, now, None).await
    }
    async fn revoke_token(&self, site_id: &str, token_id: &str, now: u64) -> Result<Option<Token>> {
        let Some(token) = self.get_token(site_id, token_id).await? else {
            return Ok(None);
        };
        // The usage item carries the flag the hot path's condition checks. It, the
        // record and the hash item expire (TTL) once past the time a revoked token
        // is kept; a second revocation changes neither time.
        let usage = self
            .client
            .update_item()
            .table_name(&*self.table)
            .set_key(Some(key(format!("TOKEN#{token_id}"), "USAGE")))
            .update_expression(
                "SET revoked_at = if_not_exists(revoked_at, :now), \
                 #exp = if_not_exists(#exp, :exp)",
            )
            .expression_attribute_names("#exp", TTL_ATTRIBUTE)
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":exp", n(now + crate::domain::REVOKED_KEPT_SECS))
            .return_values(ReturnValue::AllNew)
            .send()
            .await
            .map_err(sdk)?;
        let attrs = usage.attributes.unwrap_or_default();
        let (Some(revoked_at), Some(expires_at)) =
            (get_n(&attrs, "revoked_at"), get_n(&attrs, TTL_ATTRIBUTE))
        else {
            return Err(StoreError::Corrupt("token usage item".into()));
        };
        // The record and the hash item at once: neither waits on the other. The
        // record is written over as read, so a move meanwhile is read again.
        let record = async {
            for _ in 0..5 {
                let record = key(format!("TOKEN#{token_id}"), "TOKEN");
                let Some(stored) = self.get_item(record, true).await? else {
                    return Ok(None);
                };
                let mut t: Token = data(&stored)?;
                t.revoked_at.get_or_insert(revoked_at);
                match self.write_token(stored, &t, Some(expires_at)).await {
                    Err(StoreError::Changed(_)) => continue,
                    written => return written.map(|()| Some(t)),
                }
            }
            Err(unavailable("the token kept changing while being revoked"))
        };
        let hash = async {
            let expire = (self.client.update_item())
                .table_name(&*self.table)
                .set_key(Some(key(
                    format!("TOKENHASH#{}", token.token_hash),
                    "TOKENHASH",
                )))
                .update_expression("SET #exp = :exp")
                .condition_expression("attribute_exists(pk)")
                .expression_attribute_names("#exp", TTL_ATTRIBUTE)
                .expression_attribute_values(":exp", n(expires_at))
                .send()
                .await;
            match expire {
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
                {
                    Ok(())
                }
                other => other.map(drop).map_err(sdk),
            }
        };
        let (updated, ()) = tokio::try_join!(record, hash)?;
        Ok(updated.or(Some(token)))
    }
}

impl DynamoStore {
    /// Write the token record `now` over `stored` (its item as read) if that is still
    /// stored, with `expires_at` for TTL when given; in the same transaction, the
    /// counts of active tokens on the plans follow (an active token counts on its
    /// plan). `Changed` if the record changed meanwhile; `Missing("plan")` if `now` is
    /// active on a plan that does not exist. A plan the token leaves that no longer
    /// exists, or has no count above zero (both only with data from before plans
    /// counted their tokens), is left alone.
    async fn write_token(&self, stored: Item, now: &Token, expires_at: Option<u64>) -> Result<()> {
        let was: Token = data(&stored)?;
        let counted = |t: &Token| t.revoked_at.is_none().then(|| t.plan_id.clone());
        let mut counts = Vec::new();
        if counted(&was) != counted(now) {
            counts.extend(counted(now).map(|p| (p, 1)));
            counts.extend(counted(&was).map(|p| (p, -1)));
        }
        let mut item = token_item(now);
        if let Some(at) = expires_at {
            item.insert(TTL_ATTRIBUTE.into(), n(at));
        }
        let read = Item::from([(":was".into(), stored["d"].clone())]);
        loop {
            let put = self.put_in_transaction(item.clone(), "d = :was", Some(read.clone()));
            let mut items = vec![put?];
            for (plan, by) in &counts {
                items.push(self.count_on_plan(&now.site_id, plan, *by)?);
            }
            let failed = match self.transact(items).await? {
                Ok(()) => return Ok(()),
                Err(failed) => failed,
            };
            if failed.first() != Some(&false) {
                return Err(StoreError::Changed(now.token_id.clone()));
            }
            match failed.iter().skip(1).position(|f| *f) {
                Some(i) if counts[i].1 < 0 => {
                    counts.remove(i);
                }
                _ => return Err(StoreError::Missing("plan".into())),
            }
        }
    }
}

#[async_trait]
impl KeyStore for DynamoStore {
    async fn create_key(&self, k: &ApiKey) -> Result<()> {
        let mut item = key(format!("KEYHASH#{}", k.key_hash), "KEY");
        item.insert("gsi1pk".into(), s(format!("SITE#{}#KEYS", k.site_id)));
        item.insert("gsi1sk".into(), s(format!("KEY#{}", k.key_id)));
        self.put_new(with_data(item, k), "API key").await
    }
    async fn key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKey>> {
        self.get_item(key(format!("KEYHASH#{key_hash}"), "KEY"), true)
            .await?
            .map(|i| data(&i))
            .transpose()
    }
    async fn list_keys(&self, site_id: &str) -> Result<Vec<ApiKey>> {
        self.query_all(Some(GSI1), "gsi1pk", &format!("SITE#{site_id}#KEYS"), None)
            .await?
            .iter()
            .map(data)
            .collect()
    }
    async fn revoke_key(&self, site_id: &str, key_id: &str, now: u64) -> Result<Option<ApiKey>> {
        let found = self
            .query_all(
                Some(GSI1),
                "gsi1pk",
                &format!("SITE#{site_id}#KEYS"),
                Some(("gsi1sk", &format!("KEY#{key_id}"))),
            )
            .await?;
        let Some(item) = found.into_iter().next() else {
            return Ok(None);
        };
        let k: ApiKey = data(&item)?;
        let updated = self
            .update_data::<ApiKey>(key(format!("KEYHASH#{}", k.key_hash), "KEY"), |k| {
                // TTL deletes the key once it is past the time it stays listed.
                Some(*k.revoked_at.get_or_insert(now) + crate::domain::REVOKED_KEPT_SECS)
            })
            .await?;
        Ok(updated.map(|(_, k)| k))
    }
    async fn update_key(&self, was: &ApiKey, now: &ApiKey) -> Result<()> {
        let record = key(format!("KEYHASH#{}", was.key_hash), "KEY");
        self.put_over(record, was, &was.key_id, |stored| with_data(stored, now))
            .await
    }
}

#[async_trait]
impl UsageStore for DynamoStore {
    async fn count_request(&self, mut req: CountRequest) -> Result<Counting> {
        let (site_ok, token) = tokio::join!(
            self.count_site(&req.site_id, req.site_requests_per_second, req.now_ms),
            self.count_token(&req)
        );
        let ((site_ok, site_counter), token) = (site_ok?, token?);
        let minute = req.now_ms / MINUTE_MS;
        let counted = match token {
            Counted::Evaluated(eval) if eval.verdict == Verdict::Allow && !site_ok => {
                // The site limit denies: give the token its count back.
                self.uncount(
                    key(format!("TOKEN#{}", req.token_id), "USAGE"),
                    vec![
                        format!("m_{minute}"),
                        format!("q_{}", period_of(req.now_ms)),
                    ],
                );
                let mut denied = eval;
                denied.verdict = Verdict::SiteRateLimited;
                denied.retry_after_secs = Some(1);
                denied.events.clear();
                denied.remaining_quota += 1;
                denied.remaining_minute += 1;
                Counted::Evaluated(denied)
            }
            other => {
                let allowed =
                    matches!(&other, Counted::Evaluated(e) if e.verdict == Verdict::Allow);
                if site_ok && !allowed {
                    // A denied request does not use the site's budget.
                    self.uncount(site_counter, vec!["c".into()]);
                }
                other
            }
        };
        req.record_outcome(&counted);
        if let Counted::Evaluated(eval) = &counted {
            if eval.verdict == Verdict::Allow {
                self.record_events(&req, eval).await?;
            }
        }
        self.enqueue_audit(req.audit).await?;
        Ok(Counting {
            counted,
            durable: already_durable(),
        })
    }

    async fn record_failed_attempt(
        &self,
        site_id: &str,
        client: Option<&str>,
        audit: AuditRecord,
    ) -> Result<u64> {
        let mut attempts = 0;
        if let Some(c) = client {
            let minute = audit.ts_ms / MINUTE_MS;
            let out = self
                .client
                .update_item()
                .table_name(&*self.table)
                .set_key(Some(key(format!("SITE#{site_id}"), format!("FAIL#{c}"))))
                .update_expression("ADD #mc :one SET expires_at = :exp REMOVE #m2")
                .expression_attribute_names("#mc", format!("m_{minute}"))
                .expression_attribute_names("#m2", format!("m_{}", minute - 2))
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":exp", n(audit.ts_ms / 1000 + 86_400))
                .return_values(ReturnValue::AllNew)
                .send()
                .await
                .map_err(sdk)?;
            let item = out.attributes.unwrap_or_default();
            let w = window_from(&item, minute);
            attempts = w.used(audit.ts_ms);
        }
        self.enqueue_audit(audit).await?;
        Ok(attempts)
    }

    async fn token_usage(&self, token_id: &str) -> Result<TokenUsage> {
        let item = self
            .get_item(key(format!("TOKEN#{token_id}"), "USAGE"), true)
            .await?;
        Ok(usage_from(item.as_ref(), crate::domain::now_ms()))
    }

    /// `BatchGetItem`, strongly consistent, 100 usage items a call; keys DynamoDB
    /// leaves unprocessed (throttling) are asked for again, with backoff, a few times.
    async fn token_usages(&self, token_ids: &[String]) -> Result<Vec<TokenUsage>> {
        use aws_sdk_dynamodb::types::KeysAndAttributes;
        let pk = |id: &str| format!("TOKEN#{id}");
        let unique: std::collections::BTreeSet<&str> =
            token_ids.iter().map(|i| i.as_str()).collect();
        let unique: Vec<&str> = unique.into_iter().collect();
        let mut found: HashMap<String, Item> = HashMap::new();
        for chunk in unique.chunks(100) {
            let mut keys: Vec<Item> = chunk.iter().map(|id| key(pk(id), "USAGE")).collect();
            let mut backoff = Duration::from_millis(20);
            for attempt in 0.. {
                let ask = KeysAndAttributes::builder()
                    .set_keys(Some(keys))
                    .consistent_read(true)
                    .build()
                    .map_err(unavailable)?;
                let out = self
                    .client
                    .batch_get_item()
                    .request_items(&*self.table, ask)
                    .send()
                    .await
                    .map_err(sdk)?;
                let items = out.responses.and_then(|mut r| r.remove(&*self.table));
                for item in items.unwrap_or_default() {
                    if let Some(Ok(p)) = item.get("pk").map(|v| v.as_s()) {
                        found.insert(p.clone(), item);
                    }
                }
                keys = (out.unprocessed_keys)
                    .and_then(|mut u| u.remove(&*self.table))
                    .map(|k| k.keys)
                    .unwrap_or_default();
                if keys.is_empty() {
                    break;
                }
                if attempt == 4 {
                    return Err(unavailable("usage reads left unprocessed (throttled)"));
                }
                back_off(&mut backoff).await;
            }
        }
        let now = crate::domain::now_ms();
        Ok(token_ids
            .iter()
            .map(|id| usage_from(found.get(&pk(id)), now))
            .collect())
    }
}

#[async_trait]
impl AuditStore for DynamoStore {
    async fn append_audit(&self, record: AuditRecord) -> Result<()> {
        self.enqueue_audit(record).await
    }

    async fn query_audit(
        &self,
        site_id: &str,
        filter: &AuditFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<AuditRecord>> {
        self.query_audit_reading(site_id, filter, limit, cursor, AUDIT_READ_PER_SHARD)
            .await
    }

    async fn purge_expired(&self, _now_s: u64) -> Result<u64> {
        // DynamoDB's TTL deletes expired records (within about two days of
        // `expires_at`); the dashboard never asks for records past their retention.
        Ok(0)
    }
}

/// About the most records one logs query reads from each shard. A filter that few
/// records match would otherwise read a site's whole 90 days for one page; past
/// this the page ends early, with fewer items and a cursor to go on from.
const AUDIT_READ_PER_SHARD: usize = 2_500;

impl DynamoStore {
    async fn query_audit_reading(
        &self,
        site_id: &str,
        filter: &AuditFilter,
        limit: usize,
        cursor: Option<&str>,
        read_per_shard: usize,
    ) -> Result<Page<AuditRecord>> {
        // This process's own records first reach the table.
        self.pending.wait().await;
        let before = match cursor {
            Some(c) => Some(
                URL_SAFE_NO_PAD
                    .decode(c)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .filter(|k| {
                        k.len() > 14
                            && k.as_bytes()[13] == b'#'
                            && k[..13].bytes().all(|b| b.is_ascii_digit())
                    })
                    .ok_or(StoreError::InvalidCursor)?,
            ),
            None => None,
        };
        let low = format!("{:013}", filter.from_ms.unwrap_or(0));
        let high = format!("{:013}$", filter.to_ms.unwrap_or(9_999_999_999_999)); // '$' > '#'
        let upper = match &before {
            Some(b) if *b < high => b.clone(),
            _ => high,
        };
        if upper < low {
            // Nothing in the window (DynamoDB rejects a BETWEEN whose bounds are
            // inverted, which a cursor from before `from` would make).
            return Ok(Page {
                items: Vec::new(),
                next_cursor: None,
            });
        }
        // Newest first from each shard, `limit + 1` matches at most, then merge.
        // Every record at or above `floor` has been read in every shard: a shard
        // that stopped with more to read raises it to the lowest key it read.
        let mut all: Vec<(String, AuditRecord)> = Vec::new();
        let mut floor = String::new();
        for shard in 0..AUDIT_SHARDS {
            let (mut start, mut matched, mut read) = (None, 0, 0);
            let mut lowest = None;
            loop {
                // The first page fits a page of answers; later ones (a filter
                // dropped records) read more at a time.
                let page_size = if start.is_none() { limit + 1 } else { 1000 };
                let page = self
                    .client
                    .query()
                    .table_name(&*self.table)
                    .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
                    .expression_attribute_values(":pk", s(format!("AUDIT#{site_id}#{shard}")))
                    .expression_attribute_values(":lo", s(&low))
                    .expression_attribute_values(":hi", s(&upper))
                    .scan_index_forward(false)
                    .limit((page_size as i32).clamp(2, 1000))
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(sdk)?;
                for item in page.items.unwrap_or_default() {
                    let sk = get_s(&item, "sk").unwrap_or_default().to_owned();
                    if sk >= upper {
                        continue; // BETWEEN is inclusive; the cursor is exclusive
                    }
                    read += 1;
                    let r: AuditRecord = data(&item)?;
                    if filter.matches(&r) {
                        all.push((sk.clone(), r));
                        matched += 1;
                    }
                    lowest = Some(sk);
                }
                match page.last_evaluated_key {
                    Some(k) if !k.is_empty() => {
                        if matched <= limit && read < read_per_shard {
                            start = Some(k);
                            continue;
                        }
                        if let Some(l) = lowest.take() {
                            floor = floor.max(l);
                        }
                        break;
                    }
                    _ => break,
                }
            }
        }
        all.retain(|(sk, _)| *sk >= floor);
        all.sort_by(|a, b| b.0.cmp(&a.0));
        let next_cursor = if all.len() > limit {
            all.truncate(limit);
            all.last().map(|(sk, _)| URL_SAFE_NO_PAD.encode(sk))
        } else if !floor.is_empty() {
            Some(URL_SAFE_NO_PAD.encode(&floor))
        } else {
            None
        };
        Ok(Page {
            items: all.into_iter().map(|(_, r)| r).collect(),
            next_cursor,
        })
    }
}

#[async_trait]
impl EventStore for DynamoStore {
    async fn list_events(
        &self,
        site_id: &str,
        limit: usize,
        after: Option<(&str, u32, &str)>,
    ) -> Result<Page<QuotaEvent>> {
        let start = after.map(|(token, period, kind)| event_key(site_id, token, period, kind));
        let items = (self.query_up_to(self.events_query(site_id), limit + 1, start)).await?;
        Ok(page_of(items, limit, event_cursor))
    }
}

#[async_trait]
impl AdminTrail for DynamoStore {
    async fn record_admin(&self, event: &AdminEvent) -> Result<()> {
        let sk = format!("{:013}#{}", event.ts_ms, event.id);
        let mut item = key("ADMIN", sk.clone());
        if let Some(site) = &event.site_id {
            item.insert("site_id".into(), s(site));
        }
        if let Some(owner) = &event.owner {
            item.insert("gsi1pk".into(), s(format!("OWNER#{owner}#ADMIN")));
            item.insert("gsi1sk".into(), s(sk));
        }
        self.put_item(with_data(item, event)).await
    }

    async fn list_admin(
        &self,
        limit: usize,
        owner: Option<&str>,
        before: Option<(u64, &str)>,
    ) -> Result<Page<AdminEvent>> {
        let (index, pk_name, sk_name, pk) = match owner {
            Some(o) => (Some(GSI1), "gsi1pk", "gsi1sk", format!("OWNER#{o}#ADMIN")),
            None => (None, "pk", "sk", "ADMIN".to_owned()),
        };
        let mut q = self
            .client
            .query()
            .table_name(&*self.table)
            .set_index_name(index.map(Into::into))
            .expression_attribute_names("#pk", pk_name)
            .expression_attribute_values(":pk", s(&pk))
            .scan_index_forward(false);
        q = match before {
            Some((ts, id)) => q
                .key_condition_expression("#pk = :pk AND #sk < :before")
                .expression_attribute_names("#sk", sk_name)
                .expression_attribute_values(":before", s(format!("{ts:013}#{id}"))),
            None => q.key_condition_expression("#pk = :pk"),
        };
        let items = self.query_up_to(q, limit + 1, None).await?;
        Ok(page_of(items, limit, admin_cursor))
    }
}

#[async_trait]
impl Store for DynamoStore {
    async fn ping(&self) -> Result<()> {
        self.client
            .describe_table()
            .table_name(&*self.table)
            .send()
            .await
            .map_err(sdk)?;
        Ok(())
    }

    async fn settle(&self) {
        self.pending.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store on a new table of the test server (`scripts/test.sh`), or `None`
    /// (outside CI) without one.
    async fn test_store() -> Option<DynamoStore> {
        let Some(endpoint) = std::env::var("PAYFENCE_TEST_DYNAMODB")
            .ok()
            .filter(|e| !e.is_empty())
        else {
            assert!(std::env::var_os("CI").is_none(), "run scripts/test.sh");
            eprintln!("SKIPPED: no DynamoDB test server (run scripts/test.sh)");
            return None;
        };
        let table = format!("test-{}", hex::encode(crate::ids::random_bytes::<6>()));
        let store = DynamoStore::connect(&table, Some(&endpoint)).await;
        store.ensure_table().await.unwrap();
        Some(store)
    }

    /// A logs query that reads only a few records a shard still returns every match
    /// once, newest first, over more pages (some of them empty).
    #[tokio::test]
    async fn a_query_past_its_read_budget_goes_on_where_it_stopped() {
        let Some(store) = test_store().await else {
            return;
        };
        let t0 = 1_795_000_020_000;
        for i in 0..80u64 {
            let ts_ms = t0 + i * 10;
            let path = if i % 7 == 0 { "/match" } else { "/other" };
            let r = crate::domain::test_record("site_a", ts_ms, path);
            store.append_audit(r).await.unwrap();
        }
        let matches = AuditFilter {
            path_prefix: Some("/match".into()),
            ..Default::default()
        };
        let expected: Vec<u64> = (0..80)
            .rev()
            .filter(|i| i % 7 == 0)
            .map(|i| t0 + i * 10)
            .collect();
        let everything = store
            .query_audit("site_a", &matches, 1000, None)
            .await
            .unwrap();
        assert!(everything.next_cursor.is_none());
        let ts: Vec<u64> = everything.items.iter().map(|r| r.ts_ms).collect();
        assert_eq!(ts, expected);
        for (budget, limit) in [(1, 2), (2, 1), (3, 5)] {
            let (store, matches) = (&store, &matches);
            let (seen, pages) = all_pages(limit, |cursor| async move {
                let cursor = cursor.as_deref();
                store
                    .query_audit_reading("site_a", matches, limit, cursor, budget)
                    .await
            })
            .await;
            assert_eq!(seen, expected, "budget {budget}, limit {limit}");
            assert!(
                pages > expected.len() / limit,
                "budget {budget}: {pages} pages"
            );
        }
    }

    /// Deleting a site deletes its quota events past the first page of the keys
    /// query (1,000 keys), and leaves another site's. The events are written
    /// directly, 25 a call: made by requests, 1,000 take the test server a minute.
    #[tokio::test]
    async fn deleting_a_site_deletes_every_page_of_its_quota_events() {
        use aws_sdk_dynamodb::types::PutRequest;
        let Some(store) = test_store().await else {
            return;
        };
        let sealing = crate::seal::SealingKey::from_bytes(&[9; 32]);
        let [gone, kept] =
            ["o1", "o2"].map(|o| Site::new(o, "s", "https://a.example", &sealing, 1).0);
        let event = |site: &Site, i: usize| {
            let e = QuotaEvent {
                event_id: format!("evt_{i}_{}", site.site_id),
                site_id: site.site_id.clone(),
                token_id: crate::ids::token_id(),
                plan: "pro".into(),
                kind: QuotaEventKind::Warning,
                used: 80,
                quota: 100,
                period: 202611,
                created_at: 1,
                status: "pending".into(),
            };
            let at = event_key(&e.site_id, &e.token_id, e.period, e.kind.as_str());
            with_data(at, &e)
        };
        let events = (0..2_030)
            .map(|i| event(&gone, i))
            .chain((0..3).map(|i| event(&kept, i)));
        let events: Vec<Item> = events.collect();
        for chunk in events.chunks(25) {
            let puts = chunk.iter().map(|item| {
                let put = PutRequest::builder().set_item(Some(item.clone()));
                WriteRequest::builder()
                    .put_request(put.build().unwrap())
                    .build()
            });
            let out = (store.client.batch_write_item())
                .request_items(&*store.table, puts.collect())
                .send()
                .await
                .unwrap();
            assert!(out.unprocessed_items.unwrap_or_default().is_empty());
        }
        for site in [&gone, &kept] {
            store.create_site(site).await.unwrap();
        }
        // One call reads them all (`list_events` queries on until it has `limit`).
        let count = |site_id: String| {
            let store = &store;
            async move {
                let page = store.list_events(&site_id, 10_000, None).await.unwrap();
                assert!(page.next_cursor.is_none());
                page.items.len()
            }
        };
        assert_eq!(count(gone.site_id.clone()).await, 2_030);
        assert!(store.delete_site(&gone.site_id).await.unwrap());
        assert_eq!(count(gone.site_id.clone()).await, 0);
        assert_eq!(count(kept.site_id.clone()).await, 3);
        assert!(store.get_site(&kept.site_id).await.unwrap().is_some());
    }

    /// Data written before plans counted their tokens: a token left on a deleted
    /// plan is still revoked or moved (no stray plan item is made for the count),
    /// and a plan without a count starts counting at the next token, its older
    /// tokens leaving it never taking the count below zero.
    #[tokio::test]
    async fn tokens_and_plans_from_before_the_count() {
        let Some(store) = test_store().await else {
            return;
        };
        let site_id = "site_00000000000000aa";
        // As the store wrote them before: a plan item without a count, and tokens
        // whose records, usage and hash items were written without one.
        let (old, gone) = (
            Plan::new(site_id, "pro", 60, 1000, 1),
            "plan_00000000000000a2",
        );
        store.put_item(plan_item(&old)).await.unwrap();
        let legacy = |plan_id: &str| Token {
            token_id: crate::ids::token_id(),
            site_id: site_id.into(),
            plan_id: plan_id.into(),
            token_hash: crate::ids::hash_secret(&crate::ids::consumer_token()),
            label: None,
            consumer: None,
            created_at: 1,
            revoked_at: None,
        };
        let (orphan, moved, older) = (legacy(gone), legacy(gone), legacy(&old.plan_id));
        for t in [&orphan, &moved, &older] {
            let mut hash = key(format!("TOKENHASH#{}", t.token_hash), "TOKENHASH");
            hash.insert("token_id".into(), s(&t.token_id));
            hash.insert("site_id".into(), s(site_id));
            let mut usage = key(format!("TOKEN#{}", t.token_id), "USAGE");
            usage.insert("site_id".into(), s(site_id));
            for item in [token_item(t), hash, usage] {
                store.put_item(item).await.unwrap();
            }
        }
        let revoked = store.revoke_token(site_id, &orphan.token_id, 5).await;
        assert_eq!(revoked.unwrap().unwrap().revoked_at, Some(5));
        // An uncounted token leaving the plan without a count takes nothing off.
        let revoked = store.revoke_token(site_id, &older.token_id, 5).await;
        assert_eq!(revoked.unwrap().unwrap().revoked_at, Some(5));
        let to_old = Token {
            plan_id: old.plan_id.clone(),
            ..moved.clone()
        };
        store.update_token(&moved, &to_old).await.unwrap();
        assert_eq!(store.get_plan(site_id, gone).await.unwrap(), None);
        let plans = store.list_plans(site_id).await.unwrap();
        assert_eq!(
            plans,
            vec![old.clone()],
            "no stray item for the deleted plan"
        );
        // The moved token is the old plan's first counted one.
        let deleted = store.delete_plan(site_id, &old.plan_id).await.unwrap();
        assert_eq!(deleted, PlanDeletion::InUse(1));
        store
            .revoke_token(site_id, &moved.token_id, 6)
            .await
            .unwrap();
        let deleted = store.delete_plan(site_id, &old.plan_id).await.unwrap();
        assert_eq!(deleted, PlanDeletion::Deleted);
    }
}
