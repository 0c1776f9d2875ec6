//! The one shape every component has, and the context it is built with.
//!
//! A component (each source kind, OTA, the bridge, the broker, the HTTP endpoint; the
//! journal thread is wrapped into the same [`Running`]) goes through three steps, in
//! [`crate::gateway::run`]:
//! 1. `X::build(&XConfig, &Ctx, ..) -> Result<X, XError>`: what can fail at start (files,
//!    TLS material, broker links) fails here, before the component runs. What a component
//!    needs besides its own config section and the [`Ctx`] (a broker to link to, the store)
//!    is an explicit argument after the context.
//! 2. `X::start(self, stop) -> Running`: spawns its tasks or threads under `stop`; cannot
//!    fail. Two steps bind ports, by design after the sources started, and so can fail
//!    (ending `run` with the error): `Broker::start` (async: its listeners open last so no
//!    device connects before the pipeline behind them runs) and, after it, the HTTP
//!    endpoint's `Http::build`.
//! 3. [`Running::stop`]: cancels `stop`, then waits for the tasks until a deadline. The
//!    gateway walks its stop list ([`stop_all`]) in order under one budget; the components
//!    of one stage (the sources) are cancelled together; whoever overruns is named in the
//!    log, and the walk goes on.
//!
//! A leaf: it imports nothing from the crate but the [`crate::metrics`] registry, the
//! device [`crate::board`] and [`crate::topic`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Registry;

/// What every component is built with besides its own config section: values derived once
/// from the whole configuration.
#[derive(Clone)]
pub struct Ctx {
    /// `gateway.id`: the cloud client id and `{gateway_id}` in topic templates.
    pub gateway_id: String,
    /// Where a component adds its metric families.
    pub registry: Arc<Registry>,
    /// Where the sources show their devices to the operator page.
    pub board: Arc<crate::board::Board>,
}

impl Ctx {
    /// Replaces `{gateway_id}` in a topic template.
    pub fn expand(&self, template: &str) -> String {
        crate::topic::with_gateway_id(template, &self.gateway_id)
    }
}

/// A component that did not stop before its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overran {
    /// The component's name (its config key).
    pub name: &'static str,
    /// How long it was waited for.
    pub waited: Duration,
}

type Done = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A started component: the token that stops it and what to wait for.
pub struct Running {
    name: &'static str,
    stop: Option<CancellationToken>,
    cap: Option<Duration>,
    done: Done,
}

impl Running {
    /// A component whose tasks end when `stop` is cancelled; `done` resolves when they have.
    pub fn new(
        name: &'static str,
        stop: CancellationToken,
        done: impl Future<Output = ()> + Send + 'static,
    ) -> Running {
        Running {
            name,
            stop: Some(stop),
            cap: None,
            done: Box::pin(done),
        }
    }

    /// One or more tokio tasks stopped by `stop`.
    pub fn tasks(
        name: &'static str,
        stop: CancellationToken,
        tasks: Vec<JoinHandle<()>>,
    ) -> Running {
        Running::new(name, stop, async move {
            for t in tasks {
                let _ = t.await;
            }
        })
    }

    /// A thread stopped by `stop` (joined off the runtime threads).
    pub fn thread(
        name: &'static str,
        stop: CancellationToken,
        thread: std::thread::JoinHandle<()>,
    ) -> Running {
        Running::new(name, stop, async move {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        })
    }

    /// A last step with nothing to cancel (e.g. persisting what the stopped parts left).
    pub fn step(name: &'static str, done: impl Future<Output = ()> + Send + 'static) -> Running {
        Running {
            name,
            stop: None,
            cap: None,
            done: Box::pin(done),
        }
    }

    /// Waits for this component at most `cap`, even when the overall budget leaves more.
    pub fn at_most(mut self, cap: Duration) -> Running {
        self.cap = Some(cap);
        self
    }

    /// Cancels the component's token (its tasks begin to stop).
    pub fn cancel(&self) {
        if let Some(stop) = &self.stop {
            stop.cancel();
        }
    }

    /// Cancels the component's token and waits for it until `deadline` (or its own cap,
    /// whichever comes first). What overran is left running detached: the process is about
    /// to exit.
    pub async fn stop(self, deadline: Instant) -> Result<(), Overran> {
        self.cancel();
        let start = Instant::now();
        let deadline = match self.cap {
            Some(cap) => deadline.min(start + cap),
            None => deadline,
        };
        match tokio::time::timeout_at(deadline, self.done).await {
            Ok(()) => Ok(()),
            Err(_) => Err(Overran {
                name: self.name,
                waited: start.elapsed(),
            }),
        }
    }
}

/// Stops `stages` in order under one `budget`: the components of a stage are cancelled
/// together, then each is waited for. Returns whoever overran, in order, each also logged.
pub async fn stop_all(stages: Vec<Vec<Running>>, budget: Duration) -> Vec<Overran> {
    let deadline = Instant::now() + budget;
    let mut overran = Vec::new();
    for stage in stages {
        for r in &stage {
            r.cancel();
        }
        for r in stage {
            if let Err(o) = r.stop(deadline).await {
                tracing::warn!(
                    component = o.name,
                    waited_ms = o.waited.as_millis() as u64,
                    "did not stop in time; stopping the rest"
                );
                overran.push(o);
            }
        }
    }
    overran
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_stop_list_runs_in_order_and_names_who_overran() {
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let quick = CancellationToken::new();
        let o = order.clone();
        let q = quick.clone();
        let first = Running::tasks(
            "first",
            quick.clone(),
            vec![tokio::spawn(async move {
                q.cancelled().await;
                o.lock().unwrap().push("first");
            })],
        );
        // Ignores its token: only its cap ends the wait.
        let stuck = Running::tasks(
            "stuck",
            CancellationToken::new(),
            vec![tokio::spawn(std::future::pending::<()>())],
        )
        .at_most(Duration::from_secs(2));
        let o = order.clone();
        let last = Running::step("last", async move {
            o.lock().unwrap().push("last");
        });
        let t0 = Instant::now();
        let overran = stop_all(
            vec![vec![first, stuck], vec![last]],
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(overran.len(), 1);
        assert_eq!(overran[0].name, "stuck");
        assert_eq!(overran[0].waited, Duration::from_secs(2));
        assert_eq!(*order.lock().unwrap(), vec!["first", "last"]);
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn one_budget_bounds_the_whole_walk() {
        let stuck = |name| {
            Running::tasks(
                name,
                CancellationToken::new(),
                vec![tokio::spawn(std::future::pending::<()>())],
            )
        };
        let t0 = Instant::now();
        let overran = stop_all(
            vec![vec![stuck("a")], vec![stuck("b")]],
            Duration::from_secs(5),
        )
        .await;
        let names: Vec<_> = overran.iter().map(|o| o.name).collect();
        assert_eq!(names, vec!["a", "b"]);
        assert_eq!(overran[1].waited, Duration::ZERO);
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
    }
}
