//! Watches whose every error ends in a fresh list.
//!
//! kube's watcher resumes a broken watch from its last resourceVersion and
//! re-lists only when the API server answers 410 Gone. Between the break
//! and that answer — while it backs off from an API server that is away —
//! its consumer cannot tell a complete view from a stale one, and a
//! controller whose other watch re-listed first decides on both (creates
//! the claims of pods deleted meanwhile, say). Here any error after a
//! complete list restarts the watcher: the stream says `Init` at once (the
//! [`Feed`](crate::Feed) stops being current, decisions wait) and lists
//! again, after a pause that grows while lists keep failing soon after
//! they completed.
//!
//! The cost is one list of the collection per watch error. The errors this
//! targets (an API server restarting, a connection moved) mostly end in a
//! 410 and a list anyway.

use std::fmt;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use kube::Resource;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::time::Instant;

use crate::Backoff;

/// Pauses before a re-list, by errors in a row that came soon after a list.
const PAUSE: Backoff = Backoff {
    base: Duration::from_millis(250),
    max: Duration::from_secs(30),
};

/// A watch that lasted this long counts as working: the next pause is short again.
const STABLE: Duration = Duration::from_secs(60);

type Events<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;

struct Relisting<K: Resource + 'static> {
    api: Api<K>,
    config: watcher::Config,
    events: Events<K>,
    /// When the current watcher's list completed.
    listed_at: Option<Instant>,
    /// Errors in a row that came soon after a list.
    quick_failures: u32,
    /// Set after an error: say `Init`, pause, then list with a new watcher.
    restart: Option<Duration>,
    announce: bool,
}

fn events<K>(api: &Api<K>, config: &watcher::Config) -> Events<K>
where
    K: Resource + Clone + fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    watcher::watcher(api.clone(), config.clone()).default_backoff().boxed()
}

/// kube's watcher of `api` with `config`, restarted from a fresh list after
/// any error once it has listed; an `Init` precedes every restart.
pub fn relisting<K>(api: Api<K>, config: watcher::Config) -> Events<K>
where
    K: Resource + Clone + fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let state = Relisting {
        events: events(&api, &config),
        api,
        config,
        listed_at: None,
        quick_failures: 0,
        restart: None,
        announce: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        if std::mem::take(&mut state.announce) {
            return Some((Ok(Event::Init), state));
        }
        if let Some(pause) = state.restart.take() {
            tokio::time::sleep(pause).await;
            state.events = events(&state.api, &state.config);
        }
        let event = state.events.next().await?;
        match &event {
            Ok(Event::InitDone) => state.listed_at = Some(Instant::now()),
            Err(_) => {
                if let Some(listed_at) = state.listed_at.take() {
                    state.quick_failures = if listed_at.elapsed() < STABLE {
                        state.quick_failures + 1
                    } else {
                        1
                    };
                    state.restart = Some(PAUSE.delay(state.quick_failures));
                    state.announce = true;
                }
            }
            _ => {}
        }
        Some((event, state))
    })
    .boxed()
}
