//! Dynamic batching for ONNX models: one worker thread owns the model's runs; requests queue up
//! (bounded) and those that arrive within `window` of the first are run as one padded batch, so
//! concurrent clients share a forward pass instead of taking turns.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::drift::Sample;
use crate::models::bert::BertModel;

/// Settings of a batching worker.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// How long the worker waits for more requests after the first; zero runs each alone.
    pub window: Duration,
    /// Texts per batch at most.
    pub max_texts: usize,
    /// Requests waiting at most; more are refused.
    pub queue: usize,
}

type Reply = Result<Vec<Sample>, String>;

struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Reply>,
}

/// Why a request was not scored.
#[derive(Debug)]
pub enum BatchError {
    /// The queue is full: the client should retry later.
    Busy,
    /// The model failed on the batch.
    Failed(String),
}

/// The handle requests use; dropping it stops the worker once the queue is drained.
pub struct Batcher {
    tx: SyncSender<Job>,
}

impl Batcher {
    pub fn start(model: Arc<BertModel>, config: BatchConfig, on_batch: impl Fn(usize) + Send + 'static) -> Batcher {
        let (tx, rx) = sync_channel(config.queue.max(1));
        std::thread::Builder::new()
            .name("onnx-batcher".into())
            .spawn(move || work(&model, &rx, config, on_batch))
            .expect("spawn the batching thread");
        Batcher { tx }
    }

    /// The scores of the texts, once the worker has run the batch holding them.
    pub async fn predict(&self, texts: Vec<String>) -> Result<Vec<Sample>, BatchError> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(Job { texts, reply }).map_err(|e| match e {
            TrySendError::Full(_) => BatchError::Busy,
            TrySendError::Disconnected(_) => BatchError::Failed("the model worker stopped".into()),
        })?;
        match rx.await {
            Ok(reply) => reply.map_err(BatchError::Failed),
            Err(_) => Err(BatchError::Failed("the model worker stopped".into())),
        }
    }
}

fn work(model: &BertModel, rx: &Receiver<Job>, config: BatchConfig, on_batch: impl Fn(usize)) {
    let mut pending: Option<Job> = None;
    loop {
        let first = match pending.take() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let mut jobs = vec![first];
        let mut count = jobs[0].texts.len();
        let deadline = Instant::now() + config.window;
        while !config.window.is_zero() && count < config.max_texts {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(job) if count + job.texts.len() <= config.max_texts => {
                    count += job.texts.len();
                    jobs.push(job);
                }
                // Too big to join this batch: it starts the next one.
                Ok(job) => {
                    pending = Some(job);
                    break;
                }
                Err(_) => break,
            }
        }
        let texts: Vec<&str> = jobs.iter().flat_map(|j| j.texts.iter().map(String::as_str)).collect();
        on_batch(texts.len());
        match model.predict_batch(&texts) {
            Ok(scores) => {
                let mut rest = scores.as_slice();
                for job in jobs {
                    let (mine, tail) = rest.split_at(job.texts.len());
                    rest = tail;
                    let _ = job.reply.send(Ok(mine.to_vec()));
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.to_string()));
                }
            }
        }
    }
}
