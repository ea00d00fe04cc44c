//! Plumbing shared by volplane's controllers (capacity, ephemeral, health)
//! and the CSI client: the bottom of the crate stack, so it depends on none
//! of them.
//!
//! - [`leadership`]: the write permission a controller holds; every write
//!   goes through [`Leadership::guard`].
//! - [`events`]: publishing an event under that guard, its note cut to the
//!   API server's limit.
//! - [`backoff`]: the one exponential backoff of the controllers' retries.
//! - [`control_loop`]: the wake-act loop of the capacity and health controllers.
//! - [`index`]: indexes with apply / delete / reset, fed by a watch; a
//!   re-list deletes what vanished, and decisions wait while it runs.
//! - [`phase`]: where in a poll interval a periodic check of one item falls.
//! - [`relist`]: watches that list again after any error, so a stale
//!   view is never taken for a complete one.
//! - [`readiness`]: the "caches synced" flag behind `/readyz`.
//! - [`naming`]: names Kubernetes derives, which two controllers must agree on.
//! - [`slim`]: objects deserialized with only the fields controllers read.
//! - [`work_queue`]: the work queue keyed by value, with backoff and poll spreading.
//! - [`text`]: cuts text from outside (CSI drivers, the API server,
//!   admission webhooks) to the lengths the API server accepts, on a
//!   character boundary.

pub mod backoff;
pub mod control_loop;
pub mod entries;
pub mod events;
pub mod index;
pub mod leadership;
pub mod naming;
pub mod phase;
pub mod readiness;
pub mod relist;
pub mod slim;
pub mod text;
pub mod work_queue;

pub use backoff::Backoff;
pub use entries::{Change, Entries, Entry};
pub use index::{Fed, Feed, Index, Keyed, ObjectKey};
pub use leadership::{Leadership, NotLeader, Term};
pub use readiness::Readiness;
pub use work_queue::WorkQueue;
