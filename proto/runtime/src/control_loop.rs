//! The loop of the hand-written controllers (capacity, health): wake on a
//! watch signal, a finished task, a change of leadership or the next due
//! time; act; repeat. At shutdown the tasks in flight finish first.

use std::future::Future;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use tokio::time::Instant;

use crate::Leadership;

/// A controller's state between wake-ups.
pub trait State {
    /// What the watches deliver.
    type Signal;
    /// What a finished task reports.
    type Done;

    /// Brings the state up to date before waiting (follows leadership,
    /// starts due work); returns the latest time to wake up.
    fn before_wait(&mut self) -> Option<Instant>;
    /// The leadership the state acts under.
    fn leadership(&self) -> &Leadership;
    /// Whether it was leading when last looked at.
    fn leading(&self) -> bool;
    /// The tasks in flight.
    fn tasks(&mut self) -> &mut FuturesUnordered<BoxFuture<'static, Self::Done>>;
    /// A watch delivered `signal`.
    fn signal(&mut self, signal: Self::Signal);
    /// A task finished.
    fn finished(&mut self, done: Self::Done);
    /// Shutdown began; the tasks in flight finish next.
    fn stopping(&mut self) {}
    /// A task finished after shutdown began.
    fn finished_on_shutdown(&mut self, done: Self::Done);
}

/// Runs `state` until `shutdown` completes or `signals` ends, then waits
/// for the tasks in flight.
pub async fn run<S: State>(
    state: &mut S,
    mut signals: impl Stream<Item = S::Signal> + Unpin,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let wake = state.before_wait();
        let leadership = state.leadership().clone();
        let leadership_changed = leadership.changed_from(state.leading());
        let busy = !state.tasks().is_empty();
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(done) = state.tasks().next(), if busy => state.finished(done),
            signal = signals.next() => match signal {
                Some(signal) => state.signal(signal),
                None => break,
            },
            () = leadership_changed => {}
            () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
        }
    }
    state.stopping();
    while let Some(done) = state.tasks().next().await {
        state.finished_on_shutdown(done);
    }
}
