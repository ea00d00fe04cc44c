//! Running a controller in the background of a test until the test stops it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The shutdown signal handed to a controller's `run`: completes when the
/// test calls [`Background::stop`] (or drops the [`Background`]).
#[derive(Debug)]
pub struct Shutdown(oneshot::Receiver<()>);

impl Future for Shutdown {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// A future running on its own task, told to stop through its [`Shutdown`].
#[derive(Debug)]
pub struct Background<T> {
    stop: oneshot::Sender<()>,
    task: JoinHandle<T>,
}

impl<T: Send + 'static> Background<T> {
    /// Spawns `run(shutdown)`.
    pub fn spawn<Fut>(run: impl FnOnce(Shutdown) -> Fut) -> Self
    where
        Fut: Future<Output = T> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        Self {
            stop,
            task: tokio::spawn(run(Shutdown(stopped))),
        }
    }

    /// Signals shutdown and returns the output; fails the test if that takes over `limit`.
    pub async fn stop(self, limit: Duration) -> T {
        let _ = self.stop.send(());
        match tokio::time::timeout(limit, self.task).await {
            Ok(Ok(output)) => output,
            Ok(Err(error)) => panic!("background task failed: {error}"),
            Err(_) => panic!("background task did not stop within {limit:?}"),
        }
    }
}
