//! The elector: takes and renews a Lease with kube-lease-manager, watches
//! the Lease itself, and publishes the [`Term`] controllers write under.
//!
//! kube-lease-manager does the locking (server-side apply, so two
//! candidates cannot both take a free lease) and renews `retry_period`
//! after each renewal. Its own view of leadership does not expire when
//! renewals fail or hang, so the elector only publishes a term backed by
//! a renewal it has seen on the Lease object: the term ends
//! `renew_deadline` after the last observed `renewTime`, even if no
//! message arrives (a paused process cannot write on after resuming).
//! Watching the Lease also lets a waiting candidate take a released lease
//! at once instead of sleeping until its old expiry. While it leads and
//! the watch has shown no renewal by a quarter of the slack (renew deadline
//! minus retry period) after the next one was due, the elector reads the
//! Lease through the lease client: a term lasts while its renewals succeed,
//! whatever the watch does.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::watcher;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use volplane_runtime::leadership::{Leadership, Term};
use volplane_runtime::{Feed, Index, ObjectKey, relist};

/// Settings of one election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectionConfig {
    /// Lease name, e.g. `volplane-capacity-hostpath-csi-k8s-io`.
    pub lease_name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This candidate's unique identity (`holderIdentity`).
    pub identity: String,
    /// `leaseDurationSeconds`: how long others wait after the last renewal.
    pub lease_duration: Duration,
    /// The leader stops writing when its last renewal is this old.
    pub renew_deadline: Duration,
    /// Time between renewals, and between attempts to take the lease.
    pub retry_period: Duration,
}

impl ElectionConfig {
    /// Checks the timing: whole seconds (the Lease API counts seconds) and
    /// `retry_period < renew_deadline < lease_duration`, so that a leader
    /// stops writing before anybody else may start.
    pub fn validate(&self) -> Result<(), TimingError> {
        let whole = |d: Duration| d.subsec_nanos() == 0 && d.as_secs() > 0;
        if !whole(self.lease_duration) || !whole(self.retry_period) {
            return Err(TimingError::NotWholeSeconds {
                lease_duration: self.lease_duration,
                retry_period: self.retry_period,
            });
        }
        if !(self.retry_period < self.renew_deadline && self.renew_deadline < self.lease_duration) {
            return Err(TimingError::OutOfOrder {
                retry_period: self.retry_period,
                renew_deadline: self.renew_deadline,
                lease_duration: self.lease_duration,
            });
        }
        Ok(())
    }
}

/// Election timing that cannot work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    /// The Lease API counts whole seconds.
    #[error(
        "--leader-election-lease-duration ({lease_duration:?}) and --leader-election-retry-period ({retry_period:?}) must be whole seconds of at least 1s"
    )]
    NotWholeSeconds {
        /// The lease duration given.
        lease_duration: Duration,
        /// The retry period given.
        retry_period: Duration,
    },
    /// A leader must stop writing before anybody else may start.
    #[error(
        "leader election needs retry period ({retry_period:?}) < renew deadline ({renew_deadline:?}) < lease duration ({lease_duration:?})"
    )]
    OutOfOrder {
        /// The retry period given.
        retry_period: Duration,
        /// The renew deadline given.
        renew_deadline: Duration,
        /// The lease duration given.
        lease_duration: Duration,
    },
}

/// Leader-election metrics, labelled by lease.
#[derive(Debug, Default)]
pub struct ElectionMetrics {
    leader: Family<Vec<(String, String)>, Gauge>,
    transitions: Family<Vec<(String, String)>, Counter>,
}

impl ElectionMetrics {
    /// The leading gauge and transitions counter of lease `lease`.
    fn of(&self, lease: &str) -> (Gauge, Counter) {
        let labels = vec![("lease".to_string(), lease.to_string())];
        (
            self.leader.get_or_create(&labels).clone(),
            self.transitions.get_or_create(&labels).clone(),
        )
    }

    /// Registers `leader_election_*` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "leader_election_leading",
            "1 while this process holds the lease and may write, 0 otherwise",
            metrics.leader.clone(),
        );
        registry.register(
            "leader_election_transitions",
            "Times this process started or stopped leading",
            metrics.transitions.clone(),
        );
        metrics
    }
}

/// What the elector has seen of the Lease object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Observed {
    holder: Option<String>,
    renewed: Option<SystemTime>,
    /// The Lease's resourceVersion when it is a number (etcd's revision, as
    /// every API server writes it): the watch may deliver a version older
    /// than the one read after taking the lease, and that must not undo it.
    version: Option<u64>,
}

impl Observed {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            holder: spec.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty()),
            renewed: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0.into()),
            version: lease.metadata.resource_version.as_deref().and_then(|v| v.parse().ok()),
        }
    }

    /// Whether `self` is an older version of the Lease than `known`.
    fn older_than(&self, known: &Observed) -> bool {
        matches!((self.version, known.version), (Some(new), Some(old)) if new < old)
    }
}

/// Runs one election and publishes its [`Term`].
pub struct Elector {
    lease_client: kube::Client,
    watch_client: kube::Client,
    config: ElectionConfig,
    metrics: Arc<ElectionMetrics>,
    term: watch::Sender<Term>,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector").field("config", &self.config).finish()
    }
}

impl Elector {
    /// An elector; `lease_client` makes the lock requests (give it timeouts
    /// shorter than the renew deadline), `watch_client` watches the Lease.
    pub fn new(
        lease_client: kube::Client,
        watch_client: kube::Client,
        config: ElectionConfig,
        metrics: Arc<ElectionMetrics>,
    ) -> Self {
        Self {
            lease_client,
            watch_client,
            config,
            metrics,
            term: watch::channel(Term::Following).0,
        }
    }

    /// The leadership controllers of this group write under.
    pub fn leadership(&self) -> Leadership {
        Leadership::new(self.term.subscribe())
    }

    /// Campaigns until `shutdown` completes, then stops leading and
    /// releases the lease if held, so a successor need not wait for expiry.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let config = &self.config;
        let (leading_gauge, transitions) = self.metrics.of(&config.lease_name);
        let lease_api: Api<Lease> = Api::namespaced(self.lease_client.clone(), &config.namespace);
        let mut leases = self.lease_watch();
        let mut lease_feed = Feed::new("lease");
        let mut state = Campaign::new(config, &self.term, &leading_gauge, &transitions);
        let mut manager: Option<LeaseManager> = None;
        // The loop ends on shutdown, unless the Lease watch ends first.
        let mut watch_ended = false;
        tokio::pin!(shutdown);
        info!(lease = %config.lease_name, namespace = %config.namespace, identity = %config.identity, "leader election starting");
        loop {
            let Some(current) = manager.as_ref() else {
                tokio::select! {
                    () = &mut shutdown => break,
                    built = self.manager_or_pause() => manager = built,
                }
                continue;
            };
            let deadline = state.deadline();
            let next = tokio::select! {
                biased;
                () = &mut shutdown => break,
                changed = current.changed() => state.manager_changed(changed, &lease_api).await,
                event = leases.next() => match event {
                    Some(event) => state.lease_event(&mut lease_feed, event),
                    None => {
                        watch_ended = true;
                        break;
                    }
                },
                () = sleep_until(deadline), if deadline.is_some() => Next::Keep,
                // No renewal seen for a retry period: the watch may be
                // broken while renewals succeed. Read the Lease.
                () = tokio::time::sleep_until(state.next_confirmation), if state.manager_leads => {
                    state.confirm_renewal(&lease_api).await;
                    Next::Keep
                }
            };
            state.publish();
            match next {
                Next::Keep => {}
                Next::Rebuild => manager = None,
                Next::RebuildLater => {
                    manager = None;
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(config.retry_period) => {}
                    }
                }
            }
        }
        state.step_down(!watch_ended);
        if let Some(manager) = manager {
            release(config, manager).await;
        }
    }

    /// The watch of this election's Lease (through the watch client, so
    /// that a slow watch never delays a renewal).
    fn lease_watch(&self) -> futures::stream::BoxStream<'static, Result<watcher::Event<Lease>, watcher::Error>> {
        let config = &self.config;
        relist::relisting(
            Api::<Lease>::namespaced(self.watch_client.clone(), &config.namespace),
            watcher::Config::default().fields(&format!("metadata.name={}", config.lease_name)),
        )
    }

    /// A lease manager; `None` after a failed setup and a retry period.
    async fn manager_or_pause(&self) -> Option<LeaseManager> {
        match self.build_manager().await {
            Ok(built) => Some(built),
            Err(error) => {
                warn!(lease = %self.config.lease_name, %error, "cannot set up the lease; retrying");
                tokio::time::sleep(self.config.retry_period).await;
                None
            }
        }
    }

    async fn build_manager(&self) -> Result<LeaseManager, kube_lease_manager::LeaseManagerError> {
        let config = &self.config;
        let grace = config
            .lease_duration
            .saturating_sub(config.retry_period)
            .as_secs()
            .max(1);
        LeaseManagerBuilder::new(self.lease_client.clone(), &config.lease_name)
            .with_namespace(&config.namespace)
            .with_identity(&config.identity)
            .with_duration(config.lease_duration.as_secs())
            .with_grace(grace)
            .with_field_manager(format!("volplane-{}", config.identity))
            .build()
            .await
    }
}

/// What happens to the lease manager after an event.
enum Next {
    Keep,
    /// A fresh manager re-reads the Lease (its cached expiry would make it wait).
    Rebuild,
    /// After a failed request: a fresh manager, one retry period later.
    RebuildLater,
}

/// Gives the lease up at shutdown, within the renew deadline.
async fn release(config: &ElectionConfig, manager: LeaseManager) {
    match tokio::time::timeout(config.renew_deadline, manager.release()).await {
        Ok(Ok(())) => info!(lease = %config.lease_name, "lease released"),
        Ok(Err(error)) => warn!(lease = %config.lease_name, %error, "cannot release the lease; it expires by itself"),
        Err(_) => warn!(lease = %config.lease_name, "releasing the lease timed out; it expires by itself"),
    }
}

async fn sleep_until(deadline: Option<SystemTime>) {
    let wait = deadline
        .and_then(|d| d.duration_since(SystemTime::now()).ok())
        .unwrap_or_default();
    // Wake just after the deadline so that the term has ended by then.
    tokio::time::sleep(wait + Duration::from_millis(1)).await;
}

/// The elector's bookkeeping between events.
struct Campaign<'a> {
    config: &'a ElectionConfig,
    term: &'a watch::Sender<Term>,
    observed: Observed,
    /// What the last Lease event asks of the lease manager.
    next: Next,
    /// When to read the Lease unless the watch shows a renewal before.
    next_confirmation: tokio::time::Instant,
    manager_leads: bool,
    /// Shutdown was asked for: stepping down is expected.
    stopping: bool,
    number: u64,
    published: Term,
    leading_gauge: &'a Gauge,
    transitions: &'a Counter,
}

impl<'a> Campaign<'a> {
    fn new(
        config: &'a ElectionConfig,
        term: &'a watch::Sender<Term>,
        leading_gauge: &'a Gauge,
        transitions: &'a Counter,
    ) -> Self {
        Self {
            config,
            term,
            observed: Observed::default(),
            next: Next::Keep,
            next_confirmation: tokio::time::Instant::now() + config.retry_period,
            manager_leads: false,
            stopping: false,
            number: 0,
            published: Term::Following,
            leading_gauge,
            transitions,
        }
    }
}

impl Campaign<'_> {
    /// The lease manager says whether it leads, or that a request failed.
    async fn manager_changed(
        &mut self,
        changed: Result<bool, kube_lease_manager::LeaseManagerError>,
        lease_api: &Api<Lease>,
    ) -> Next {
        match changed {
            Ok(leads) => {
                self.manager_leads = leads;
                if leads {
                    // Read our renewal now rather than wait for the watch.
                    if let Ok(lease) = lease_api.get(&self.config.lease_name).await {
                        let observed = Observed::of(&lease);
                        self.observe_renewal(&observed);
                        self.observed = observed;
                    }
                }
                Next::Keep
            }
            Err(error) => {
                warn!(lease = %self.config.lease_name, %error, "lease request failed; stepping down until it works again");
                self.manager_leads = false;
                Next::RebuildLater
            }
        }
    }

    /// Reads the Lease through the lease client: a renewal it shows
    /// extends the term although the watch did not deliver it (the watch
    /// backs off from an API server that is away, say).
    async fn confirm_renewal(&mut self, lease_api: &Api<Lease>) {
        // Not there yet: look again soon, well before the deadline.
        self.next_confirmation = tokio::time::Instant::now() + self.confirmation_margin();
        match lease_api.get(&self.config.lease_name).await {
            Ok(lease) => {
                let observed = Observed::of(&lease);
                if !observed.older_than(&self.observed) {
                    self.observe_renewal(&observed);
                    self.observed = observed;
                }
            }
            Err(error) => {
                debug!(lease = %self.config.lease_name, %error, "cannot read the lease; the term ends at its deadline")
            }
        }
    }

    /// How long after a renewal is due the Lease is read if the watch has
    /// not shown it: a quarter of the slack between the renewal and the
    /// renew deadline.
    fn confirmation_margin(&self) -> Duration {
        (self.config.renew_deadline.saturating_sub(self.config.retry_period) / 4).max(Duration::from_millis(10))
    }

    /// A renewal newer than the one known pushes the next read to just
    /// after the renewal that follows it.
    fn observe_renewal(&mut self, observed: &Observed) {
        let Some(renewed) = observed.renewed.filter(|_| observed.renewed != self.observed.renewed) else {
            return;
        };
        let due = renewed + self.config.retry_period + self.confirmation_margin();
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        self.next_confirmation = tokio::time::Instant::now() + wait;
    }

    /// The watch of the Lease delivered `event`: fed to the Lease's index
    /// (this campaign), a re-list without the Lease is its deletion.
    fn lease_event(&mut self, feed: &mut Feed, event: Result<watcher::Event<Lease>, watcher::Error>) -> Next {
        match event {
            Ok(event) => {
                feed.feed(event, self);
                std::mem::replace(&mut self.next, Next::Keep)
            }
            Err(error) => {
                warn!(lease = %self.config.lease_name, %error, "lease watch failed; retrying");
                Next::Keep
            }
        }
    }

    /// The campaign ends: no more writes (`stopping`: as asked, at shutdown).
    fn step_down(&mut self, stopping: bool) {
        self.manager_leads = false;
        self.stopping = stopping;
        self.publish();
    }

    /// The term the facts support now.
    fn current(&self) -> Option<SystemTime> {
        let until = self.observed.renewed? + self.config.renew_deadline;
        (self.manager_leads
            && self.observed.holder.as_deref() == Some(self.config.identity.as_str())
            && SystemTime::now() < until)
            .then_some(until)
    }

    /// When the published term ends unless renewed.
    fn deadline(&self) -> Option<SystemTime> {
        match self.published {
            Term::Leading { until, .. } => until,
            Term::Following => None,
        }
    }

    fn publish(&mut self) {
        let next = match (self.current(), self.published) {
            (Some(until), Term::Leading { number, .. }) => Term::Leading {
                number,
                until: Some(until),
            },
            (Some(until), Term::Following) => {
                self.number += 1;
                Term::Leading {
                    number: self.number,
                    until: Some(until),
                }
            }
            (None, _) => Term::Following,
        };
        let was_leading = matches!(self.published, Term::Leading { .. });
        let leading = matches!(next, Term::Leading { .. });
        if leading != was_leading {
            self.transitions.inc();
            self.leading_gauge.set(i64::from(leading));
            if leading {
                info!(lease = %self.config.lease_name, identity = %self.config.identity, "started leading");
            } else {
                let why = if self.stopping {
                    None
                } else if !self.manager_leads {
                    Some("the lease is not ours")
                } else {
                    Some("the last renewal is older than the renew deadline")
                };
                match why {
                    None => info!(lease = %self.config.lease_name, "stopped leading: shutting down"),
                    Some(why) => warn!(lease = %self.config.lease_name, why, "stopped leading; no more writes"),
                }
            }
        }
        self.published = next;
        self.term.send_replace(next);
    }
}

/// The Lease, as an index of one object.
impl Index<Lease> for Campaign<'_> {
    fn apply(&mut self, lease: Lease) {
        let observed = Observed::of(&lease);
        if observed.older_than(&self.observed) {
            return;
        }
        // Only a release wakes a manager that waits for the old holder's
        // expiry; a lease that was free already (a fresh one) is being
        // taken, and a rebuild would cancel that.
        let released = self.observed.holder.is_some() && observed.holder.is_none();
        self.observe_renewal(&observed);
        self.observed = observed;
        if released && !self.manager_leads {
            debug!(lease = %self.config.lease_name, "lease released; trying to take it now");
            self.next = Next::Rebuild;
        }
    }

    fn delete(&mut self, _: &ObjectKey) {
        self.observed = Observed::default();
        self.manager_leads = false;
        self.next = Next::Rebuild;
    }

    fn keys(&self) -> Vec<ObjectKey> {
        let held = self.observed.version.is_some() || self.observed.holder.is_some();
        held.then(|| ObjectKey::namespaced(&self.config.namespace, &self.config.lease_name))
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;

    use super::*;

    fn lease(holder: Option<&str>) -> Lease {
        Lease {
            metadata: kube::api::ObjectMeta {
                name: Some("volplane-test".into()),
                namespace: Some("default".into()),
                ..kube::api::ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                ..LeaseSpec::default()
            }),
        }
    }

    fn config() -> ElectionConfig {
        ElectionConfig {
            lease_name: "volplane-test".into(),
            namespace: "default".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    #[test]
    fn only_a_release_rebuilds_the_manager() {
        let config = config();
        let term = watch::channel(Term::Following).0;
        let (gauge, counter) = (Gauge::default(), Counter::default());
        let mut campaign = Campaign::new(&config, &term, &gauge, &counter);
        let mut feed = Feed::new("lease");
        // A fresh lease, free from the start: the manager is taking it, and
        // a rebuild would cancel that (then retry after a conflict backoff).
        let free = campaign.lease_event(&mut feed, Ok(watcher::Event::InitApply(lease(None))));
        assert!(matches!(free, Next::Keep));
        let free_again = campaign.lease_event(&mut feed, Ok(watcher::Event::Apply(lease(None))));
        assert!(matches!(free_again, Next::Keep));
        // Held by another, then released: take it now, not at its expiry.
        let held = campaign.lease_event(&mut feed, Ok(watcher::Event::Apply(lease(Some("other")))));
        assert!(matches!(held, Next::Keep));
        let released = campaign.lease_event(&mut feed, Ok(watcher::Event::Apply(lease(None))));
        assert!(matches!(released, Next::Rebuild));
        // Deleted: a fresh manager recreates it.
        let deleted = campaign.lease_event(&mut feed, Ok(watcher::Event::Delete(lease(Some("other")))));
        assert!(matches!(deleted, Next::Rebuild));
    }

    fn versioned(holder: Option<&str>, version: &str, renewed: SystemTime) -> Lease {
        let mut lease = lease(holder);
        lease.metadata.resource_version = Some(version.into());
        if let Some(spec) = lease.spec.as_mut() {
            spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                k8s_openapi::jiff::Timestamp::try_from(renewed).expect("a time after 1970"),
            ));
        }
        lease
    }

    #[test]
    fn a_watch_event_older_than_the_lease_read_after_taking_it_keeps_the_term() {
        let config = config();
        let term = watch::channel(Term::Following).0;
        let (gauge, counter) = (Gauge::default(), Counter::default());
        let mut campaign = Campaign::new(&config, &term, &gauge, &counter);
        let mut feed = Feed::new("lease");
        let now = SystemTime::now();
        // Taken: the manager leads, and the Lease read right after says so.
        campaign.manager_leads = true;
        campaign.observed = Observed::of(&versioned(Some("me"), "12", now));
        campaign.publish();
        assert!(matches!(*term.borrow(), Term::Leading { number: 1, .. }));
        // The watch then delivers the free Lease as it was before (an older
        // version): still leading, no transition.
        let stale = campaign.lease_event(&mut feed, Ok(watcher::Event::Apply(versioned(None, "11", now))));
        assert!(matches!(stale, Next::Keep));
        campaign.publish();
        assert!(matches!(*term.borrow(), Term::Leading { number: 1, .. }));
        assert_eq!(counter.get(), 1, "one transition: started leading");
        // A newer version that names another holder does end the term.
        campaign.lease_event(
            &mut feed,
            Ok(watcher::Event::Apply(versioned(Some("other"), "13", now))),
        );
        campaign.publish();
        assert!(matches!(*term.borrow(), Term::Following));
    }

    #[test]
    fn a_relist_without_the_lease_is_its_deletion() {
        let config = config();
        let (term, _) = watch::channel(Term::Following);
        let (gauge, transitions) = (Gauge::default(), Counter::default());
        let mut campaign = Campaign::new(&config, &term, &gauge, &transitions);
        let mut feed = Feed::new("lease");
        campaign.lease_event(&mut feed, Ok(watcher::Event::Init));
        campaign.lease_event(&mut feed, Ok(watcher::Event::InitApply(lease(Some("other")))));
        campaign.lease_event(&mut feed, Ok(watcher::Event::InitDone));
        assert_eq!(campaign.observed.holder.as_deref(), Some("other"));
        // Deleted while the watch was away: the re-list does not bring it.
        campaign.lease_event(&mut feed, Ok(watcher::Event::Init));
        let next = campaign.lease_event(&mut feed, Ok(watcher::Event::InitDone));
        assert!(matches!(next, Next::Rebuild));
        assert_eq!(campaign.observed, Observed::default());
    }
}
