//! Pipelines: parsing and validating YAML files into a DAG of typed stages, planning and running
//! them, and the lock file that records what each stage last produced.

pub mod diag;
pub mod exec;
pub mod graph;
mod interp;
pub mod key;
pub mod lock;
pub mod param;
pub mod report;
pub mod spec;
mod stage;
pub mod task;
pub mod worker;
pub mod yaml;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

pub use diag::{Diagnostic, Diagnostics};
pub use graph::Dag;
pub use param::{Override, ParamValue};
pub use stage::{ParamUse, Stage};

use crate::executors::Executors;
use crate::stages::StageKind;
use spec::{PipelineFile, RawStage};
use yaml::{child_path, Document};

/// A validated pipeline: every name resolved, every parameter typed, the graph acyclic.
#[derive(Debug)]
pub struct Pipeline {
    pub name: String,
    /// The pipeline file, as given.
    pub file: PathBuf,
    /// The project root: relative paths in the pipeline are relative to it.
    pub root: PathBuf,
    /// Parameter values after `--set` overrides.
    pub params: Map<String, Value>,
    /// Stages in file order.
    pub stages: Vec<Stage>,
    pub dag: Dag,
}

/// The project root of a pipeline file: the parent of a `pipelines/` directory that holds it,
/// otherwise the directory that holds it.
pub fn project_root(file: &Path) -> PathBuf {
    let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    match (dir.file_name(), dir.parent()) {
        (Some(name), Some(parent)) if name == "pipelines" => parent.to_path_buf(),
        _ => dir,
    }
}

/// Where `path` really is: made absolute, each existing prefix resolved by the file system
/// (symbolic links followed), `..` applied to what is already resolved, and the components that
/// do not exist yet appended as written. So a path is judged by where a write or read through it
/// would land, not by its text.
pub fn real_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut real = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                real.pop();
            }
            Component::CurDir => {}
            Component::Normal(name) => {
                real.push(name);
                if let Ok(resolved) = std::fs::canonicalize(&real) {
                    real = resolved;
                }
            }
            Component::RootDir | Component::Prefix(_) => real.push(c),
        }
    }
    real
}

/// The lock file that records a pipeline's last run: `demo.yaml` → `demo.lock`.
pub fn lock_path(file: &Path) -> PathBuf {
    file.with_extension("lock")
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Reads and validates a pipeline file, applying `--set NAME=VALUE` overrides.
    pub fn load(file: &Path, overrides: &[Override]) -> Result<Pipeline, Diagnostics> {
        let source = std::fs::read_to_string(file).map_err(|e| {
            Diagnostics::one(
                Diagnostic::new(file, yaml::Pos { line: 1, col: 1 }, format!("cannot read file: {e}")),
                None,
            )
        })?;
        Self::parse(file, &source, overrides, &|name| std::env::var(name).ok())
    }

    /// Validates pipeline `source`, read from `file`; `env` resolves `${env.NAME}`.
    pub fn parse(
        file: &Path,
        source: &str,
        overrides: &[Override],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Pipeline, Diagnostics> {
        let fail = |items: Vec<Diagnostic>| Diagnostics {
            items,
            text: Some(source.to_string()),
        };
        let doc = yaml::parse(source).map_err(|e| {
            fail(vec![Diagnostic::new(
                file,
                e.pos,
                format!("invalid YAML: {}", e.message),
            )
            .hint(
                "check indentation, and quote strings that contain `: ` or start with `{`, `[`, `*` or `&`",
            )])
        })?;
        let checker = Checker { file, doc: &doc };
        if !doc.value.is_object() {
            return Err(fail(vec![Diagnostic::new(
                file,
                doc.value_pos(""),
                "a pipeline must be a mapping with `name` and `stages`",
            )]));
        }
        let head: PipelineFile = checker.typed(doc.value.clone(), "").map_err(|d| fail(vec![d]))?;
        let mut diags = Vec::new();
        if !valid_name(&head.name) {
            diags.push(
                Diagnostic::new(
                    file,
                    doc.value_pos("name"),
                    format!("invalid pipeline name `{}`", head.name),
                )
                .hint("use letters, digits, `_` and `-`"),
            );
        }
        let mut params = head.params.clone();
        for o in overrides {
            if let Err(d) = checker.apply_override(&mut params, o) {
                diags.push(d);
            }
        }

        let mut stages = Vec::new();
        for (name, value) in &head.stages {
            let path = child_path("stages", name);
            match checker.stage(name, value, &path, &head, &params, env) {
                Ok(s) => stages.push(s),
                Err(d) => diags.push(d),
            }
        }
        if head.stages.is_empty() {
            diags.push(Diagnostic::new(
                file,
                doc.value_pos("stages"),
                "the pipeline has no stages",
            ));
        }
        if !diags.is_empty() {
            return Err(fail(diags));
        }
        diags.extend(checker.outputs(&stages));
        if !diags.is_empty() {
            return Err(fail(diags));
        }
        let dag = Dag::build(&stages).map_err(|cycle| {
            // Point at the `needs` entry that closes the cycle.
            let last = &cycle[cycle.len() - 2];
            let next = &cycle[cycle.len() - 1];
            let stage = stages.iter().find(|s| &s.name == last).expect("cycle names stages");
            let i = stage.needs.iter().position(|n| n == next).unwrap_or(0);
            fail(vec![Diagnostic::new(
                file,
                doc.value_pos(&format!("stages.{last}.needs[{i}]")),
                format!("dependency cycle: {}", cycle.join(" -> ")),
            )
            .hint("a stage cannot need itself, directly or through other stages")])
        })?;
        Ok(Pipeline {
            name: head.name,
            file: file.to_path_buf(),
            root: project_root(file),
            params,
            stages,
            dag,
        })
    }
}

impl Pipeline {
    /// Checks where its stages run against the settings file's `executors` (none: every stage
    /// runs here): each `runs_on` names one of them, and a remote stage has a remote cache to
    /// take its inputs from and put its outputs in.
    pub fn check_placement(&self, executors: &Executors, remote_cache: bool) -> Result<(), Diagnostics> {
        if executors.is_empty() {
            return Ok(());
        }
        let mut diags = Vec::new();
        for s in &self.stages {
            let Some((name, at)) = &s.runs_on else { continue };
            if executors.get(name).is_none() {
                let known: Vec<&str> = executors.names().collect();
                diags.push(
                    Diagnostic::new(
                        &self.file,
                        *at,
                        format!("stage `{}` runs on unknown executor `{name}`", s.name),
                    )
                    .hint(format!(
                        "{}executors of the settings file: {}",
                        diag::did_you_mean(name, known.iter().copied()),
                        known.join(", ")
                    )),
                );
            } else if !remote_cache {
                diags.push(
                    Diagnostic::new(
                        &self.file,
                        *at,
                        format!(
                            "stage `{}` runs on executor `{name}`, which takes its inputs from and puts its outputs in a remote cache, and there is none",
                            s.name
                        ),
                    )
                    .hint("set `remote_cache: s3://BUCKET/PREFIX` beside `executors:` in the settings file (or --remote-cache), or run with --local"),
                );
            }
        }
        if diags.is_empty() {
            Ok(())
        } else {
            Err(Diagnostics {
                items: diags,
                text: std::fs::read_to_string(&self.file).ok(),
            })
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Normalises a relative output path so `./out//a` and `out/a` compare equal.
fn normalize(path: &str) -> String {
    path.split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect::<Vec<_>>()
        .join("/")
}

struct Checker<'a> {
    file: &'a Path,
    doc: &'a Document,
}

impl Checker<'_> {
    /// Deserializes `value`, found at `base` in the file, reporting errors at their position.
    fn typed<T: DeserializeOwned>(&self, value: Value, base: &str) -> Result<T, Diagnostic> {
        serde_path_to_error::deserialize(value).map_err(|err| {
            let path = yaml::error_path(base, err.path());
            let inner = err.into_inner().to_string();
            self.serde_diagnostic(&path, &inner)
        })
    }

    fn serde_diagnostic(&self, path: &str, message: &str) -> Diagnostic {
        let field = if path.is_empty() { "the pipeline" } else { path };
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let key = rest.split('`').next().unwrap_or_default();
            // The error's path may already end at the unknown key; name its parent.
            let parent = path.strip_suffix(key).map(|p| p.trim_end_matches('.')).unwrap_or(path);
            let field = if parent.is_empty() { "the pipeline" } else { parent };
            let expected = rest.split_once(", expected ").map(|x| x.1).unwrap_or("");
            let names = expected.split('`').skip(1).step_by(2);
            let hint = if expected.is_empty() {
                "remove it".to_string()
            } else {
                format!("{}expected {expected}", diag::did_you_mean(key, names))
            };
            return Diagnostic::new(
                self.file,
                self.doc.key_pos(&child_path(parent, key)),
                format!("unknown field `{key}` in {field}"),
            )
            .hint(hint);
        }
        if let Some(rest) = message.strip_prefix("missing field `") {
            let key = rest.split('`').next().unwrap_or_default();
            return Diagnostic::new(
                self.file,
                self.doc.key_pos(path),
                format!("missing field `{key}` in {field}"),
            );
        }
        Diagnostic::new(self.file, self.doc.value_pos(path), format!("{field}: {message}"))
    }

    fn apply_override(&self, params: &mut Map<String, Value>, o: &Override) -> Result<(), Diagnostic> {
        let Some(declared) = params.get(&o.name) else {
            let known: Vec<&str> = params.keys().map(String::as_str).collect();
            let mut d = Diagnostic::new(
                self.file,
                self.doc.key_pos("params"),
                format!("bad --set `{o}`: the pipeline declares no parameter `{}`", o.name),
            )
            .hint(if known.is_empty() {
                "declare it under `params:` first".to_string()
            } else {
                format!(
                    "{}declared parameters: {}",
                    diag::did_you_mean(&o.name, known.iter().copied()),
                    known.join(", ")
                )
            });
            d.unknown_parameter = Some(o.name.clone());
            return Err(d);
        };
        let path = child_path("params", &o.name);
        let value = o.value.conform(declared).map_err(|expected| {
            Diagnostic::new(
                self.file,
                self.doc.value_pos(&path),
                format!("bad --set `{o}`: `{path}` takes {expected}"),
            )
        })?;
        params.insert(o.name.clone(), value);
        Ok(())
    }

    fn stage(
        &self,
        name: &str,
        value: &Value,
        path: &str,
        head: &PipelineFile,
        params: &Map<String, Value>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Stage, Diagnostic> {
        if !valid_name(name) {
            return Err(Diagnostic::new(
                self.file,
                self.doc.key_pos(path),
                format!("invalid stage name `{name}`"),
            )
            .hint("use letters, digits, `_` and `-`"));
        }
        if !value.is_object() {
            return Err(Diagnostic::new(
                self.file,
                self.doc.value_pos(path),
                format!("stage `{name}` must be a mapping with `uses` and `with`"),
            ));
        }
        let raw: RawStage = self.typed(value.clone(), path)?;
        for (i, need) in raw.needs.iter().enumerate() {
            let at = self.doc.value_pos(&format!("{path}.needs[{i}]"));
            if need == name {
                return Err(Diagnostic::new(self.file, at, format!("stage `{name}` needs itself"))
                    .hint("remove it from `needs`"));
            }
            if !head.stages.contains_key(need) {
                let known: Vec<&str> = head.stages.keys().map(String::as_str).collect();
                return Err(
                    Diagnostic::new(self.file, at, format!("stage `{name}` needs unknown stage `{need}`")).hint(
                        format!(
                            "{}stages in this pipeline: {}",
                            diag::did_you_mean(need, known.iter().copied()),
                            known.join(", ")
                        ),
                    ),
                );
            }
        }
        let mut with = raw.with;
        let with_path = child_path(path, "with");
        let at =
            |e: interp::InterpError| Diagnostic::new(self.file, self.doc.value_pos(&e.path), e.message).hint(e.hint);
        let mut param_uses = BTreeSet::new();
        match &mut with {
            Value::Object(fields) => {
                for (field, value) in fields.iter_mut() {
                    let mut used = BTreeSet::new();
                    interp::interpolate(value, &child_path(&with_path, field), params, env, &mut used).map_err(at)?;
                    param_uses.extend(used.into_iter().map(|param| ParamUse {
                        field: field.clone(),
                        param,
                    }));
                }
            }
            other => interp::interpolate(other, &with_path, params, env, &mut BTreeSet::new()).map_err(at)?,
        }
        let tagged = serde_json::json!({"uses": raw.uses, "with": with.clone()});
        let kind: StageKind = self.typed(tagged, path).map_err(|mut d| {
            if d.message.contains("unknown variant") {
                d.pos = self.doc.value_pos(&child_path(path, "uses"));
                d.message = format!("unknown stage kind `{}` in stage `{name}`", raw.uses);
                d.hint = Some(format!(
                    "{}known kinds: {}",
                    diag::did_you_mean(&raw.uses, crate::stages::KINDS.iter().copied()),
                    crate::stages::KINDS.join(", ")
                ));
            }
            d
        })?;
        // Kinds that flatten shared settings cannot reject unknown fields through serde; every
        // kind serializes all its fields, so a key that does not come back is unknown.
        if let (Value::Object(given), Value::Object(known)) = (&with, kind.params()) {
            if let Some(key) = given.keys().find(|k| !known.contains_key(*k)) {
                let mut fields: Vec<&String> = known.keys().collect();
                fields.sort();
                let list = fields.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ");
                return Err(Diagnostic::new(
                    self.file,
                    self.doc.key_pos(&child_path(&with_path, key)),
                    format!("unknown field `{key}` in {with_path}"),
                )
                .hint(format!(
                    "{}expected one of {list}",
                    diag::did_you_mean(key, fields.iter().map(|f| f.as_str()))
                )));
            }
        }
        kind.stage()
            .check()
            .map_err(|e| Diagnostic::new(self.file, self.doc.key_pos(&with_path), format!("stage `{name}`: {e}")))?;
        raw.resources.check().map_err(|e| {
            Diagnostic::new(
                self.file,
                self.doc.value_pos(&child_path(path, "resources")),
                format!("stage `{name}`: {e}"),
            )
        })?;
        if let Some(n) = raw.max_parallel {
            let at = self.doc.value_pos(&child_path(path, "max_parallel"));
            let why = if n == 0 {
                Some("must be at least 1".to_string())
            } else if !kind.stage().has_trials() {
                Some(format!(
                    "applies to a search (`tune`), not to a `{}` stage",
                    kind.name()
                ))
            } else if raw.runs_on.is_none() {
                Some("needs `runs_on`: the trials run as jobs of that executor".to_string())
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Diagnostic::new(
                    self.file,
                    at,
                    format!("stage `{name}`: `max_parallel` {why}"),
                ));
            }
        }
        let runs_on_at = self.doc.value_pos(&child_path(path, "runs_on"));
        Ok(Stage {
            name: name.to_string(),
            needs: raw.needs,
            kind,
            param_uses,
            resources: raw.resources,
            runs_on: raw.runs_on.map(|e| (e, runs_on_at)),
            max_parallel: raw.max_parallel,
        })
    }

    /// Outputs must be relative and inside the project, but neither the project root nor in
    /// `pipelines/` or `cache/` (the engine deletes an output before its stage runs); written by
    /// one stage; not inside one another (each is cleared and cached whole); and a stage that
    /// reads another stage's output must need that stage.
    fn outputs(&self, stages: &[Stage]) -> Vec<Diagnostic> {
        let mut diags = Vec::new();
        let reserved = self.reserved();
        let mut writers: HashMap<String, &str> = HashMap::new();
        let mut written = Vec::new();
        for s in stages {
            for (i, out) in s.kind.stage().outs().iter().enumerate() {
                let at = || self.output_pos(s, i, out);
                let norm = normalize(out);
                let clash = reserved
                    .iter()
                    .find(|(r, _)| norm == *r || norm.starts_with(&format!("{r}/")));
                if out.starts_with('/') || norm.split('/').any(|p| p == "..") {
                    diags.push(
                        Diagnostic::new(
                            self.file,
                            at(),
                            format!("output `{out}` of stage `{}` is outside the project", s.name),
                        )
                        .hint("outputs are paths relative to the project root, without `..`"),
                    );
                } else if norm.is_empty() {
                    diags.push(
                        Diagnostic::new(
                            self.file,
                            at(),
                            format!("output `{out}` of stage `{}` is the project root itself", s.name),
                        )
                        .hint("the engine deletes an output before its stage runs: name a file or directory inside the project, e.g. `out/…`"),
                    );
                } else if let Some((r, what)) = clash {
                    let (place, lost) = if norm == *r {
                        ("is", what.to_string())
                    } else {
                        ("is inside", format!("files in {what}"))
                    };
                    diags.push(
                        Diagnostic::new(
                            self.file,
                            at(),
                            format!("output `{out}` of stage `{}` {place} {what} `{r}`", s.name),
                        )
                        .hint(format!(
                            "the engine deletes an output before its stage runs, which would delete {lost}: write it elsewhere, e.g. under `out/`"
                        )),
                    );
                } else if let Some(first) = writers.insert(norm.clone(), &s.name) {
                    diags.push(
                        Diagnostic::new(
                            self.file,
                            at(),
                            format!("output `{out}` is written by both `{first}` and `{}`", s.name),
                        )
                        .hint("each output must have exactly one stage writing it"),
                    );
                } else {
                    written.push((norm, s, i, out.clone()));
                }
            }
        }
        for (norm, s, i, out) in &written {
            let outer = norm
                .match_indices('/')
                .map(|(k, _)| &norm[..k])
                .find_map(|dir| writers.get(dir).map(|w| (dir, *w)));
            if let Some((dir, writer)) = outer {
                diags.push(
                    Diagnostic::new(
                        self.file,
                        self.output_pos(s, *i, out),
                        format!(
                            "output `{out}` of stage `{}` is inside output `{dir}` of stage `{writer}`",
                            s.name
                        ),
                    )
                    .hint("the engine clears and caches each output whole, so one cannot hold another: write them to separate paths, or declare only the outer one"),
                );
            }
        }
        for s in stages {
            for (i, dep) in s.kind.stage().deps().iter().enumerate() {
                if let Some(writer) = writers.get(&normalize(dep)) {
                    if *writer != s.name && !s.needs.iter().any(|n| n == writer) {
                        diags.push(
                            Diagnostic::new(
                                self.file,
                                self.doc.value_pos(&format!("stages.{}.with.deps[{i}]", s.name)),
                                format!(
                                    "stage `{}` reads `{dep}`, written by `{writer}`, but does not need `{writer}`",
                                    s.name
                                ),
                            )
                            .hint(format!("add `{writer}` to the `needs` of `{}`", s.name)),
                        );
                    }
                }
            }
        }
        diags
    }

    /// Paths, relative to the project root, that no output may be or be inside, with what they
    /// are: the default cache directory (`sentiflow run` checks the one actually used), and the
    /// pipeline files, which are the pipeline and its lock file where `pipelines/` does not hold
    /// them.
    fn reserved(&self) -> Vec<(String, &'static str)> {
        let root = project_root(self.file);
        let mut reserved = vec![
            ("pipelines".to_string(), "the pipelines directory"),
            ("cache".to_string(), "the cache directory"),
        ];
        for (path, what) in [
            (self.file.to_path_buf(), "the pipeline file"),
            (lock_path(self.file), "the pipeline's lock file"),
        ] {
            let abs = std::path::absolute(&path).unwrap_or(path);
            if let Ok(rel) = abs.strip_prefix(&root) {
                reserved.push((normalize(&rel.to_string_lossy()), what));
            }
        }
        reserved
    }

    /// Where output `i` of stage `s` is written in the file: an entry of `outs`, or the field
    /// (`out`, `metrics`) that holds it.
    fn output_pos(&self, s: &Stage, i: usize, out: &str) -> yaml::Pos {
        let with = child_path("stages", &s.name) + ".with";
        let field = match s.kind.params() {
            Value::Object(m) if m.get("out").and_then(Value::as_str) == Some(out) => Some("out".to_string()),
            Value::Object(m) => m.into_iter().find(|(_, v)| v.as_str() == Some(out)).map(|(k, _)| k),
            _ => None,
        };
        match field {
            Some(key) => self.doc.value_pos(&child_path(&with, &key)),
            None => self.doc.value_pos(&format!("{with}.outs[{i}]")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{real_path, Override, ParamUse, Pipeline};

    #[test]
    fn each_stage_records_the_parameters_its_fields_refer_to() {
        let source = "name: p\nparams: {word: hi, file: said.txt, n: 1}\nstages:\n  say: {uses: command, with: {run: 'echo ${params.word} $${params.n} > ${params.file}', outs: ['${params.file}']}}\n";
        let set: [Override; 1] = ["word=a b".parse().unwrap()];
        let p = Pipeline::parse("p.yaml".as_ref(), source, &set, &|_| None).unwrap();
        let uses: Vec<(&str, &str)> = p.stages[0]
            .param_uses
            .iter()
            .map(|ParamUse { field, param }| (field.as_str(), param.as_str()))
            .collect();
        assert_eq!(uses, [("outs", "file"), ("run", "file"), ("run", "word")]);

        let unknown: Override = "wrod=x".parse().unwrap();
        let err = Pipeline::parse("p.yaml".as_ref(), source, &[unknown], &|_| None).unwrap_err();
        let (name, problem) = err.unknown_parameter().expect("an unknown override is marked");
        assert_eq!(name, "wrod");
        assert!(
            problem.hint.as_deref().unwrap().contains("did you mean `word`"),
            "{problem:?}"
        );
    }

    #[test]
    fn real_paths_follow_links_and_apply_dotdot_where_the_file_system_would() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("project")).unwrap();
        std::fs::create_dir(root.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(root.join("elsewhere"), root.join("project/link")).unwrap();
        let p = root.join("project");
        assert_eq!(real_path(&p.join("link/new/file")), root.join("elsewhere/new/file"));
        assert_eq!(
            real_path(&p.join("link/../x")),
            root.join("x"),
            "`..` of a link's target"
        );
        assert_eq!(real_path(&p.join("new/../../escape")), root.join("escape"));
        assert_eq!(real_path(&p.join("./a//b")), p.join("a/b"));
    }

    #[test]
    fn placement_is_checked_against_the_executors_at_its_position() {
        use crate::executors::{ExecutorSpec, Executors};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        let source = "name: p\nstages:\n  big:\n    uses: command\n    runs_on: gpus\n    resources: {gpus: 1, memory: 2G, timeout: 1h}\n    with: {run: 'true', outs: [o]}\n";
        std::fs::write(&file, source).unwrap();
        let p = Pipeline::parse(&file, source, &[], &|_| None).unwrap();
        assert_eq!(p.stages[0].resources.describe(), "memory: 2G, gpus: 1, timeout: 1h");
        // Without executors every stage runs here.
        p.check_placement(&Executors::default(), false).unwrap();
        let spec: ExecutorSpec =
            serde_json::from_value(serde_json::json!({"engine": "ray", "address": "http://h:8265"})).unwrap();
        let executors = Executors([("gpu".to_string(), spec)].into());
        let err = p.check_placement(&executors, true).unwrap_err().render();
        assert!(
            err.contains("p.yaml:5:14") && err.contains("unknown executor `gpus`"),
            "{err}"
        );
        assert!(err.contains("did you mean `gpu`"), "{err}");
        let ok = source.replace("runs_on: gpus", "runs_on: gpu");
        std::fs::write(&file, &ok).unwrap();
        let p = Pipeline::parse(&file, &ok, &[], &|_| None).unwrap();
        p.check_placement(&executors, true).unwrap();
        let err = p.check_placement(&executors, false).unwrap_err().render();
        assert!(err.contains("p.yaml:5:14") && err.contains("remote cache"), "{err}");

        for (bad, says) in [
            ("{cpus: 0}", "`resources.cpus` must be at least 1"),
            ("{memory: 2GB}", "is not an amount of memory"),
            ("{timeout: 1.5h}", "is not a duration"),
            ("{gpu: 1}", "unknown field `gpu`"),
        ] {
            let text = ok.replace("{gpus: 1, memory: 2G, timeout: 1h}", bad);
            let err = Pipeline::parse(&file, &text, &[], &|_| None).unwrap_err().render();
            assert!(err.contains("p.yaml:6:") && err.contains(says), "{bad}: {err}");
        }

        // Only a search fans out, and only onto an executor.
        let command = ok.replace("runs_on: gpu", "runs_on: gpu\n    max_parallel: 2");
        let err = Pipeline::parse(&file, &command, &[], &|_| None).unwrap_err().render();
        assert!(
            err.contains("p.yaml:6:19") && err.contains("not to a `command` stage"),
            "{err}"
        );
        let search = "name: p\nstages:\n  v:\n    uses: vectorize\n    with: {out: v}\n  t:\n    uses: tune\n    needs: [v]\n    max_parallel: 4\n    with: {models: [{model: logreg, C: 1}], out: t}\n";
        let err = Pipeline::parse(&file, search, &[], &|_| None).unwrap_err().render();
        assert!(err.contains("p.yaml:9:19") && err.contains("needs `runs_on`"), "{err}");
        let placed = search.replace("max_parallel: 4", "max_parallel: 4\n    runs_on: gpu");
        let p = Pipeline::parse(&file, &placed, &[], &|_| None).unwrap();
        assert_eq!(p.stage("t").unwrap().max_parallel, Some(4));
    }
}
