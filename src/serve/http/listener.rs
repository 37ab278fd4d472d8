//! The accept loop: a cap on open connections, timeouts for clients that send too slowly or
//! nothing at all, and graceful shutdown.
//!
//! hyper 0.14's own `http1_header_read_timeout` starts when hyper begins waiting for a request,
//! so it would also close a keep-alive connection idle for that long: behind a load balancer
//! (which reuses idle connections for up to 60 s) that races its next request and answers it
//! `502`. So the header timeout here counts from a request's first byte, and an idle connection
//! has its own, longer timeout, as nginx does (`client_header_timeout`, `keepalive_timeout`).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use warp::hyper::server::conn::Http;
use warp::hyper::service::{service_fn, Service};
use warp::hyper::{Body, Request, Response};

use super::error::overloaded;
use crate::serve::service::app::App;
use crate::serve::service::metrics::Timeout;

/// The address a request came from, in its extensions.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Connections over the cap are answered `503` this many at a time; beyond that they are closed
/// at once, so a flood of them cannot exhaust the file limit either.
const REFUSING: usize = 64;

/// How long an over-the-cap connection has to send its request and read the `503`.
const REFUSE_WITHIN: Duration = Duration::from_secs(2);

/// Accepts connections on `listener` and serves each with `routes` until `signal` resolves; then
/// stops accepting, lets requests in flight finish and returns when every connection is closed.
pub async fn run<S>(app: Arc<App>, listener: TcpListener, routes: S, signal: impl std::future::Future<Output = ()>)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    let max = app.config.max_connections as usize;
    let open = Arc::new(Semaphore::new(max));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let (stop, stopped) = watch::channel(());
    tokio::pin!(signal);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or the client gave up before the accept: neither
                    // is fatal, and a pause stops a persistent error from spinning the loop.
                    tracing::warn!(
                        "accepting a connection: {e} (if open files ran out, lower --max-connections or raise `ulimit -n`)"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        match open.clone().try_acquire_owned() {
            Ok(permit) => {
                let conn = Conn::new(app.clone(), permit);
                tokio::spawn(conn.serve(stream, peer, routes.clone(), stopped.clone()));
            }
            Err(_) => {
                app.metrics.connection_refused();
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(refuse(app.clone(), stream, permit));
                }
            }
        }
    }
    drop(listener);
    let _ = stop.send(());
    // Each connection holds a permit until it closes: having them all means all are closed.
    let _ = open.acquire_many(app.config.max_connections).await;
}

/// Answers a connection over the cap with a `503` and closes it.
async fn refuse(app: Arc<App>, stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let answer = service_fn(|_| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(overloaded(&app)) }
    });
    let conn = Http::new()
        .http1_only(true)
        .http1_keep_alive(false)
        .serve_connection(stream, answer);
    let _ = tokio::time::timeout(REFUSE_WITHIN, conn).await;
}

/// One open connection: its permit, and the open-connections gauge while it lives.
struct Conn {
    app: Arc<App>,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    fn new(app: Arc<App>, permit: OwnedSemaphorePermit) -> Conn {
        app.metrics.connection_opened();
        Conn { app, _permit: permit }
    }

    async fn serve<S>(self, stream: TcpStream, peer: SocketAddr, routes: S, mut stop: watch::Receiver<()>)
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
        S::Future: Send,
    {
        let activity = Arc::new(Activity::new());
        let io = Tracked {
            stream,
            activity: activity.clone(),
        };
        let service = {
            let activity = activity.clone();
            service_fn(move |mut request: Request<Body>| {
                request.extensions_mut().insert(ClientAddr(peer));
                let handling = Handling::new(activity.clone());
                let mut routes = routes.clone();
                async move {
                    std::future::poll_fn(|cx| routes.poll_ready(cx)).await?;
                    let response = routes.call(request).await;
                    drop(handling);
                    response
                }
            })
        };
        // HTTP/1 only: the timeouts and the body rules are HTTP/1's, and no browser speaks
        // HTTP/2 without TLS.
        let conn = Http::new().http1_only(true).serve_connection(io, service);
        tokio::pin!(conn);
        let limits = Limits::of(&self.app);
        let mut stopping = false;
        loop {
            let (deadline, _) = activity.deadline(&limits);
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!("connection from {peer}: {e}");
                    }
                    return;
                }
                _ = activity.head_started.notified() => {}
                _ = stop.changed(), if !stopping => {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = tokio::time::sleep_until(deadline) => {
                    // Activity since the sleep began moves the deadline on.
                    let (due, timeout) = activity.deadline(&limits);
                    if due <= Instant::now() {
                        tracing::debug!("connection from {peer}: {} timeout, closing", timeout.as_str());
                        self.app.metrics.connection_timed_out(timeout);
                        return;
                    }
                }
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.app.metrics.connection_closed();
    }
}

struct Limits {
    header: Duration,
    idle: Duration,
}

impl Limits {
    fn of(app: &App) -> Limits {
        Limits {
            header: Duration::from_secs(app.config.header_timeout_s),
            idle: Duration::from_secs(app.config.idle_timeout_s),
        }
    }
}

/// What a connection has been doing, for its timeouts.
struct Activity {
    state: Mutex<State>,
    /// Wakes the watchdog when a request begins, so it sleeps until the earlier header deadline.
    head_started: Notify,
}

struct State {
    /// When a byte was last read or written.
    last_io: Instant,
    /// When the first byte of a request arrived, until its headers are complete.
    head_since: Option<Instant>,
    /// Requests being handled.
    handling: usize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            state: Mutex::new(State {
                last_io: Instant::now(),
                head_since: None,
                handling: 0,
            }),
            head_started: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) {
        let now = Instant::now();
        let mut s = self.lock();
        s.last_io = now;
        // Bytes read while a request is handled are its body; otherwise a request begins.
        if s.handling == 0 && s.head_since.is_none() {
            s.head_since = Some(now);
            self.head_started.notify_one();
        }
    }

    fn wrote(&self) {
        self.lock().last_io = Instant::now();
    }

    /// When the connection is due to close, and by which timeout, unless it acts before.
    fn deadline(&self, limits: &Limits) -> (Instant, Timeout) {
        let s = self.lock();
        let idle = (s.last_io + limits.idle, Timeout::Idle);
        match s.head_since {
            Some(since) => idle.min((since + limits.header, Timeout::Header)),
            None => idle,
        }
    }
}

/// A request being handled: hyper calls the service once its headers are complete.
struct Handling(Arc<Activity>);

impl Handling {
    fn new(activity: Arc<Activity>) -> Handling {
        {
            let mut s = activity.lock();
            s.head_since = None;
            s.handling += 1;
        }
        Handling(activity)
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.lock().handling -= 1;
    }
}

/// A TCP stream that records its reads and writes in `activity`.
struct Tracked {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Raises the soft limit on open files to the hard one, as Go and nginx do, so that
/// `--max-connections` rather than a default soft limit (often 1024) bounds connections; returns
/// the limit in force.
pub fn raise_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            ..limit
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}
