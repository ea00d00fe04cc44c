//! Plumbing shared by volplane's controllers.
//!
//! - [`text`]: cuts text from outside (CSI drivers, the API server,
//!   admission webhooks) to the lengths the API server accepts, on a
//!   character boundary.

pub mod text;
