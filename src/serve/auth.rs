//! API keys and per-key rate limits.
//!
//! Keys are random 32-byte tokens shown once; only their SHA-256 is stored. A request sends
//! `Authorization: Bearer <key>`; the hash is looked up, so the key itself is never compared.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
/// from the next request on).
#[derive(Default)]
pub struct Keys {
    known: Mutex<KnownKeys>,
}

#[derive(Default)]
struct KnownKeys {
    data_version: i64,
    /// Hash → id, role and when its use was last written.
    by_hash: HashMap<String, (i64, Role, Option<Instant>)>,
}

/// How often a key's `last_used_at` is written, at most.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

impl Keys {
    /// The id and role of `key`, or `None` for an unknown or revoked key.
    pub fn lookup(&self, store: &Store, key: &str) -> Result<Option<(i64, Role)>, StoreError> {
        let hash = sha256_hex(key.as_bytes());
        let version = store.outside_changes()?;
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.data_version != version {
            known.by_hash.clear();
            known.data_version = version;
        }
        let entry = match known.by_hash.get(&hash) {
            Some(e) => Some(*e),
            None => store
                .key_role(&hash)?
                .and_then(|(id, role)| Role::parse(&role).map(|r| (id, r, None))),
        };
        let Some((id, role, touched)) = entry else {
            return Ok(None);
        };
        let now = Instant::now();
        let due = touched.is_none_or(|t| now.duration_since(t) >= TOUCH_EVERY);
        if due {
            store.touch_key(id)?;
        }
        known
            .by_hash
            .insert(hash, (id, role, if due { Some(now) } else { touched }));
        Ok(Some((id, role)))
    }
}

/// Token buckets per key: `rate` tokens a second, holding at most `rate` (the burst).
pub struct Limiter {
    buckets: Mutex<HashMap<i64, (f64, Instant)>>,
}

/// The outcome of asking for a token.
pub struct Quota {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until a token is available, when refused.
    pub retry_after: u64,
}

impl Quota {
    /// Adds the rate-limit headers to a response.
    pub fn annotate(&self, mut r: warp::reply::Response) -> warp::reply::Response {
        let h = r.headers_mut();
        h.insert("x-ratelimit-limit", self.limit.into());
        h.insert("x-ratelimit-remaining", self.remaining.into());
        r
    }
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
    fn admin_keys_may_predict_but_not_the_reverse() {
        assert!(Role::Admin.allows(Role::Predict));
        assert!(!Role::Predict.allows(Role::Admin));
    }
}
