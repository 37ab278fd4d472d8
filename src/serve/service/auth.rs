//! API keys, per-key rate limits, and a lockout for addresses that send unknown keys.
//!
//! Keys are random 32-byte tokens shown once; only their SHA-256 is stored. A request sends
//! `Authorization: Bearer <key>`; the hash is looked up, so the key itself is never compared.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::metrics::Metrics;
use crate::cache::sha256_hex;
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// May predict and read model information.
    Predict,
    /// May also train, promote and read training runs.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Predict => "predict",
            Role::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "predict" => Some(Role::Predict),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Whether a key of this role may do what `need` requires.
    pub fn allows(self, need: Role) -> bool {
        self == Role::Admin || need == Role::Predict
    }
}

/// A new random key, as shown to its owner.
pub fn new_key() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("sf_{}", hex::encode(bytes)))
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading random bytes: {0}")]
    Random(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates a key with `role` and returns it; only its hash is stored.
pub fn create_key(store: &Store, role: Role, label: Option<&str>) -> Result<String, KeyError> {
    let key = new_key()?;
    store.add_key(&sha256_hex(key.as_bytes()), role.as_str(), label)?;
    Ok(key)
}

/// Known keys by hash, filled from the database as keys are first seen and forgotten whenever
/// another process changes the database (a key revoked with `sentiflow keys revoke` is refused
/// from the next request on). The lock is never held across a database call: a database that
/// does not answer delays only the requests that must ask it, never those with a known key.
#[derive(Default)]
pub struct Keys {
    known: Mutex<KnownKeys>,
}

/// A key the database holds.
#[derive(Debug, Clone)]
pub struct Known {
    pub id: i64,
    pub role: Role,
    pub label: Option<String>,
}

#[derive(Default)]
struct KnownKeys {
    data_version: i64,
    by_hash: HashMap<String, Known>,
    /// Id → when its use was last recorded (or tried); kept when `by_hash` is forgotten, so
    /// writes by this server (which change the data version too) do not make every key due again.
    touched: HashMap<i64, Instant>,
}

/// How often a key's `last_used_at` is written, at most.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

impl Keys {
    /// The key of `hash` from memory, when the database has not changed since it was read;
    /// `None` means [`Keys::lookup`] must ask the database. `PRAGMA data_version` reads the WAL
    /// index in shared memory (no file I/O, microseconds), and PostgreSQL's count of changes is
    /// in memory, so this runs on the request's thread: a hop to a blocking thread would cost more.
    pub fn cached(&self, store: &Store, hash: &str) -> Result<Option<Known>, StoreError> {
        let version = store.outside_changes()?;
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.data_version != version {
            return Ok(None);
        }
        Ok(known.by_hash.get(hash).cloned())
    }

    /// The key of `hash`, or `None` for an unknown or revoked key; reads the database, so it runs
    /// on a blocking thread.
    pub fn lookup(&self, store: &Store, hash: &str) -> Result<Option<Known>, StoreError> {
        let version = store.outside_changes()?;
        let found = store
            .key_role(hash)?
            .and_then(|(id, role, label)| Role::parse(&role).map(|role| Known { id, role, label }));
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.data_version != version {
            known.by_hash.clear();
            known.data_version = version;
        }
        // Read at `version`: a change committed since then has moved the version on, so the
        // next request asks again.
        if let Some(found) = &found {
            known.by_hash.insert(hash.to_string(), found.clone());
        }
        Ok(found)
    }

    /// Whether the use of key `id` should be recorded now; claims the recording, so one request
    /// a minute per key does it.
    pub fn touch_due(&self, id: i64) -> bool {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let due = known
            .touched
            .get(&id)
            .is_none_or(|t| now.duration_since(*t) >= TOUCH_EVERY);
        if due {
            known.touched.insert(id, now);
        }
        due
    }

    /// Records the use of key `id`. It is bookkeeping, done off the request's path: it never
    /// waits for another write in progress (a later request tries again), and neither a full
    /// disk nor an unreachable database refuses a valid key.
    pub fn touch(&self, store: &Store, id: i64, metrics: &Metrics) {
        match store.try_touch_key(id) {
            Ok(true) => {}
            Ok(false) => {
                self.known.lock().unwrap_or_else(|p| p.into_inner()).touched.remove(&id);
            }
            Err(e) => {
                tracing::warn!("recording the use of key {id}: {e}");
                metrics.store_failure("key_last_used");
            }
        }
    }
}

/// Who sent a request: the key's id, role and label, and the rate-limit quota it took.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key: Known,
    pub quota: Quota,
}

impl Caller {
    /// How logs name the caller: the key's label, else its id (never the key).
    pub fn name(&self) -> String {
        match &self.key.label {
            Some(label) => label.clone(),
            None if self.key.id == 0 => "anonymous".into(),
            None => format!("key-{}", self.key.id),
        }
    }
}

/// Token buckets per key: `rate` tokens a second, holding at most `rate` (the burst).
pub struct Limiter {
    buckets: Mutex<HashMap<i64, (f64, Instant)>>,
}

/// The outcome of asking for a token.
#[derive(Debug, Clone)]
pub struct Quota {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until a token is available, when refused.
    pub retry_after: u64,
}

impl Limiter {
    pub fn new() -> Limiter {
        Limiter {
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn take(&self, key: i64, rate: u32) -> Quota {
        let rate_f = rate.max(1) as f64;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets.entry(key).or_insert((rate_f, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate_f).min(rate_f);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Quota {
                allowed: true,
                limit: rate,
                remaining: *tokens as u32,
                retry_after: 0,
            }
        } else {
            Quota {
                allowed: false,
                limit: rate,
                remaining: 0,
                retry_after: ((1.0 - *tokens) / rate_f).ceil().max(1.0) as u64,
            }
        }
    }
}

/// Addresses tracked at most; when full, those whose window has ended are forgotten, and a new
/// address is not tracked until there is room (IPv6 holds far more addresses than memory).
const MAX_TRACKED: usize = 65_536;

/// Unknown API keys by client address: after `limit` of them within `window` of the first, the
/// address is refused until the window ends, without its keys being looked up. Keys are
/// 256-bit, so this is not what stops guessing; it stops a guesser costing a hash and a
/// database lookup per request.
pub struct Lockout {
    limit: u32,
    window: Duration,
    /// Address → failures in its window, and when the window began.
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Lockout {
    pub fn new(limit: u32, window: Duration) -> Lockout {
        Lockout {
            limit,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds until `client` may send a key again, when it has sent too many unknown ones.
    pub fn retry_after(&self, client: IpAddr) -> Option<u64> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let (n, since) = failures.get(&Self::group(client))?;
        let left = self.window.checked_sub(since.elapsed())?;
        (*n >= self.limit).then(|| left.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// Records an unknown key from `client`.
    pub fn failed(&self, client: IpAddr) {
        if self.limit == 0 {
            return;
        }
        let client = Self::group(client);
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= MAX_TRACKED && !failures.contains_key(&client) {
            failures.retain(|_, (_, since)| now.duration_since(*since) < self.window);
            if failures.len() >= MAX_TRACKED {
                return;
            }
        }
        let (n, since) = failures.entry(client).or_insert((0, now));
        if now.duration_since(*since) >= self.window {
            (*n, *since) = (0, now);
        }
        *n += 1;
    }

    /// The address counted for `ip`: an IPv6 host usually holds a whole /64, so that is counted
    /// as one; an IPv4 client reaching an IPv6 socket counts as its IPv4 address.
    fn group(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
            v4 => v4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_the_rate_and_burst_to_it() {
        let l = Limiter::new();
        assert!((0..5).all(|_| l.take(1, 5).allowed));
        let q = l.take(1, 5);
        assert!(!q.allowed && q.retry_after >= 1);
        assert!(l.take(2, 5).allowed, "keys have their own buckets");
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert!(l.take(1, 5).allowed, "a token comes back after 1/rate seconds");
    }

    #[test]
    fn an_address_is_locked_out_after_the_limit_until_its_window_ends() {
        let l = Lockout::new(2, Duration::from_millis(300));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        l.failed(a);
        assert_eq!(l.retry_after(a), None, "under the limit");
        l.failed(a);
        assert_eq!(l.retry_after(a), Some(1));
        assert_eq!(l.retry_after(b), None, "other addresses are not affected");
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        l.failed(v6("2001:db8::1"));
        l.failed(v6("2001:db8::2"));
        assert_eq!(l.retry_after(v6("2001:db8::ffff")), Some(1), "one /64 is one client");
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(l.retry_after(a), None, "the lockout ends with the window");
        let off = Lockout::new(0, Duration::from_secs(60));
        off.failed(a);
        assert_eq!(off.retry_after(a), None, "a limit of 0 turns it off");
    }

    #[test]
    fn admin_keys_may_predict_but_not_the_reverse() {
        assert!(Role::Admin.allows(Role::Predict));
        assert!(!Role::Predict.allows(Role::Admin));
    }
}
