//! Request bodies through every route of the real API (routing, authentication, JSON parsing,
//! field checks, the handlers): each must get an answer below 500, never a panic.
#![no_main]

use std::sync::{Arc, LazyLock};

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use sentiflow::serve::{create_key, routes, App, Config, Role};

#[derive(Parser)]
struct Settings {
    #[command(flatten)]
    config: Config,
}

struct Server {
    runtime: tokio::runtime::Runtime,
    app: Arc<App>,
    admin: String,
    _project: tempfile::TempDir,
}

static SERVER: LazyLock<Server> = LazyLock::new(|| {
    let project = tempfile::tempdir().expect("a scratch project");
    let pipelines = project.path().join("pipelines");
    std::fs::create_dir_all(&pipelines).expect("pipelines/");
    let settings = Settings::parse_from([
        "fuzz".as_ref(),
        "--pipelines".as_ref(),
        pipelines.as_os_str(),
        "--admin-rps".as_ref(),
        "1000000000".as_ref(),
        "--auth-fail-limit".as_ref(),
        "0".as_ref(),
    ]);
    let app = App::new(settings.config, project.path().join("cache")).expect("the app starts");
    let admin = create_key(&app.store, Role::Admin, None).expect("a key");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    Server {
        runtime,
        app,
        admin: format!("Bearer {admin}"),
        _project: project,
    }
});

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/prediction"),
    ("POST", "/feedback"),
    ("POST", "/training"),
    ("POST", "/models/v1/promote"),
    ("GET", "/best_model_parameter"),
    ("GET", "/drift?history=1"),
    ("GET", "/training/run-1"),
    ("PUT", "/prediction"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let (method, path) = ROUTES[pick as usize % ROUTES.len()];
    let s = &*SERVER;
    let mut request = warp::test::request()
        .method(method)
        .path(path)
        .header("authorization", &s.admin)
        .body(body.to_vec());
    if pick & 0x80 == 0 {
        request = request.header("content-type", "application/json");
    }
    let filter = routes(s.app.clone());
    let response = s.runtime.block_on(request.reply(&filter));
    assert!(
        response.status().as_u16() < 500,
        "{method} {path} answered {}: {:?}",
        response.status(),
        response.body()
    );
});
