//! `sentiflow serve`: a service that knows nothing of HTTP (`service`) under its HTTP face
//! (`http`: warp on tokio). Imports point down only: `http` uses `service`, never the reverse.

mod http;
mod service;

use std::sync::Arc;

pub use http::routes::routes;
pub use service::app::App;
pub use service::auth::{create_key, KeyError, Role};
pub use service::config::{db_location, settle, Config};
pub use service::policy;
pub use service::training::Offload;

/// Runs the server until SIGINT or SIGTERM, then lets requests in flight finish and records a
/// running training as interrupted.
pub async fn serve(app: Arc<App>) -> anyhow::Result<()> {
    let routes = http::routes::routes(app.clone());
    match http::listener::raise_file_limit() {
        Ok(files) if files < u64::from(app.config.max_connections) + RESERVED_FILES => tracing::warn!(
            "the open-file limit ({files}) is below --max-connections ({}) plus {RESERVED_FILES} for the server's own \
             files: connections may fail before the cap; raise the hard limit (`ulimit -Hn`, LimitNOFILE=) or lower \
             --max-connections",
            app.config.max_connections
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("raising the open-file limit: {e}; keeping the current one"),
    }
    let addr = app.config.addr;
    let socket = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("listening on {addr}: {e} (is another server on that port? choose another with --addr)")
    })?;
    let addr = socket.local_addr()?;
    let signal = shutdown_signal();
    service::background::spawn(&app);
    tracing::info!("sentiflow serving on http://{addr} (models: {:?})", app.model_names());
    http::listener::run(app.clone(), socket, warp::service(routes), signal).await;
    service::background::finish(&app);
    Ok(())
}

/// Files the server keeps open besides connections: the database, models, logs.
const RESERVED_FILES: u64 = 256;

/// Resolves on SIGTERM or SIGINT; the handlers are installed at once, so a signal that arrives
/// before the server first waits for one still shuts it down gracefully.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("shutting down: finishing requests in flight");
    }
}
