//! The thread that owns the [`Engine`]: requests arrive over a channel, events go back to
//! each request's owner. All scheduling — admission, batching, drafting, verification, stop
//! rules — is the engine's (`mla_attention::engine`); this only connects it to the routes:
//!
//! - a request whose owner has gone (client disconnected, or a route stopped reading) is
//!   cancelled before the next step, so its blocks are free at once;
//! - a failed submission (bad prompt, too long for the cache) answers that request only;
//! - a step that fails as a whole fails the active requests, and the engine serves on.

use std::sync::{mpsc, Arc, Mutex};

use mla_attention::engine::{Engine, EngineEvent, EngineSnapshot, GenerationRequest, RequestId};
use mla_attention::runner::CpuPagedModel;
use tokio::sync::mpsc::UnboundedSender;

/// One request for the engine; its events arrive on `events`.
#[derive(Debug)]
pub struct Job {
    pub request: GenerationRequest,
    pub events: UnboundedSender<EngineEvent>,
}

/// Handle to the engine thread. Dropping it stops the thread after its current step.
pub struct EngineHandle {
    jobs: Mutex<mpsc::Sender<Job>>,
    snapshot: Arc<Mutex<EngineSnapshot>>,
    /// Tokens that end every request.
    pub end_tokens: Vec<u32>,
    /// Positions the model supports (prompt + generation).
    pub max_context: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EngineHandle {
    /// Starts the thread that runs `engine`.
    pub fn start(engine: Engine<CpuPagedModel>) -> std::io::Result<EngineHandle> {
        let snapshot = Arc::new(Mutex::new(engine.snapshot()));
        let end_tokens = engine.end_tokens().to_vec();
        let max_context = mla_attention::runner::PagedModel::max_context(engine.model());
        let (tx, rx) = mpsc::channel();
        let snap = Arc::clone(&snapshot);
        std::thread::Builder::new()
            .name("care-engine".into())
            .spawn(move || run(engine, rx, snap))?;
        Ok(EngineHandle {
            jobs: Mutex::new(tx),
            snapshot,
            end_tokens,
            max_context,
        })
    }

    /// Queues a request.
    pub fn submit(&self, job: Job) -> Result<(), String> {
        lock(&self.jobs)
            .send(job)
            .map_err(|_| "the engine stopped".to_string())
    }

    pub fn snapshot(&self) -> EngineSnapshot {
        lock(&self.snapshot).clone()
    }
}

fn run(
    mut engine: Engine<CpuPagedModel>,
    rx: mpsc::Receiver<Job>,
    snapshot: Arc<Mutex<EngineSnapshot>>,
) {
    let mut owners: Vec<(RequestId, UnboundedSender<EngineEvent>)> = Vec::new();
    loop {
        if engine.is_idle() {
            *lock(&snapshot) = engine.snapshot();
            match rx.recv() {
                Ok(job) => accept(&mut engine, &mut owners, job),
                Err(_) => return, // every handle dropped
            }
        }
        while let Ok(job) = rx.try_recv() {
            accept(&mut engine, &mut owners, job);
        }
        // Owners that went away: their requests leave now, blocks freed.
        owners.retain(|(id, tx)| {
            let gone = tx.is_closed();
            if gone {
                engine.cancel(*id);
            }
            !gone
        });
        let events = match engine.step() {
            Ok(events) => events,
            Err(e) => {
                tracing::error!("engine step failed: {e}");
                for (id, tx) in owners.drain(..) {
                    engine.cancel(id);
                    let _ = tx.send(EngineEvent::Failed {
                        id,
                        message: format!("engine step failed: {e}"),
                    });
                }
                continue;
            }
        };
        for ev in events {
            let id = ev.id();
            let last = !matches!(ev, EngineEvent::Tokens { .. });
            let Some(i) = owners.iter().position(|(o, _)| *o == id) else {
                continue;
            };
            if owners[i].1.send(ev).is_err() {
                engine.cancel(id);
                owners.swap_remove(i);
            } else if last {
                owners.swap_remove(i);
            }
        }
        *lock(&snapshot) = engine.snapshot();
    }
}

fn accept(
    engine: &mut Engine<CpuPagedModel>,
    owners: &mut Vec<(RequestId, UnboundedSender<EngineEvent>)>,
    job: Job,
) {
    match engine.submit(job.request) {
        Ok(id) => owners.push((id, job.events)),
        Err(e) => {
            let _ = job.events.send(EngineEvent::Failed {
                id: RequestId(u64::MAX),
                message: e.to_string(),
            });
        }
    }
}
