//! `sentiflow keys create|list|revoke`: the API keys of the server's database.

use std::path::PathBuf;

use super::exit;
use super::project::Globals;

/// The database the server keeps its keys in, found as `sentiflow serve` finds it.
#[derive(clap::Args)]
pub(super) struct KeyDatabase {
    /// The database: a SQLite file or a `postgres://` URL [default: <project root>/sentiflow.db].
    #[arg(long, env = "SENTIFLOW_DB")]
    db: Option<String>,
    /// Directory of the pipelines; its parent is the project root.
    #[arg(long, env = "SENTIFLOW_PIPELINES", default_value = "pipelines")]
    pipelines: PathBuf,
}

impl KeyDatabase {
    fn open(&self) -> anyhow::Result<(crate::store::Store, String)> {
        let location = crate::serve::db_location(self.db.as_deref(), &self.pipelines);
        Ok((crate::store::Store::open(&location, 1)?, location.display()))
    }
}

pub(super) fn create(
    global: &Globals,
    role: crate::serve::Role,
    label: Option<String>,
    db: KeyDatabase,
) -> anyhow::Result<i32> {
    let (store, path) = db.open()?;
    let key = crate::serve::create_key(&store, role, label.as_deref())?;
    if !global.quiet {
        eprintln!("created a `{}` key in {}; it is shown only now:", role.as_str(), path);
    }
    println!("{key}");
    Ok(exit::OK)
}

pub(super) fn list(json: bool, db: KeyDatabase) -> anyhow::Result<i32> {
    let keys = db.open()?.0.keys()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&keys)?);
        return Ok(exit::OK);
    }
    let never = || "never".to_string();
    println!(
        "{:>4}  {:<20}  {:<7}  {:<24}  {:<24}  revoked",
        "id", "label", "role", "created", "last used"
    );
    for k in &keys {
        println!(
            "{:>4}  {:<20}  {:<7}  {:<24}  {:<24}  {}",
            k.id,
            k.label.as_deref().unwrap_or("-"),
            k.role,
            k.created_at,
            k.last_used_at.clone().unwrap_or_else(never),
            k.revoked_at.as_deref().unwrap_or("-")
        );
    }
    Ok(exit::OK)
}

pub(super) fn revoke(global: &Globals, key: String, db: KeyDatabase) -> anyhow::Result<i32> {
    let (store, path) = db.open()?;
    let keys = store.keys()?;
    let by_id: Vec<_> = keys.iter().filter(|k| k.id.to_string() == key).collect();
    let matches = if by_id.is_empty() {
        keys.iter()
            .filter(|k| k.label.as_deref() == Some(key.as_str()))
            .collect()
    } else {
        by_id
    };
    match matches.as_slice() {
        [one] => {
            store.revoke_key(one.id)?;
            if !global.quiet {
                eprintln!(
                    "revoked key {} ({}) in {}",
                    one.id,
                    one.label.as_deref().unwrap_or("no label"),
                    path
                );
            }
            Ok(exit::OK)
        }
        [] => {
            let labels = keys.iter().filter_map(|k| k.label.as_deref());
            eprintln!(
                "error: no key has the id or label `{key}` in {}\n  = hint: {}`sentiflow keys list` shows them",
                path,
                crate::pipeline::diag::did_you_mean(&key, labels)
            );
            Ok(exit::INVALID)
        }
        many => {
            let ids: Vec<String> = many.iter().map(|k| k.id.to_string()).collect();
            eprintln!(
                "error: {} keys have the label `{key}`\n  = hint: revoke them by id: {}",
                many.len(),
                ids.join(", ")
            );
            Ok(exit::INVALID)
        }
    }
}
