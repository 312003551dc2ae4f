//! The waypoint controller: for every Gateway of class `istio-waypoint` (the class is a flag), it
//! deploys a waypoint — ServiceAccount, Deployment and Service named after the Gateway — and
//! reports the Service's address in the Gateway's status, as istiod's deployment controller does
//! for Istio's waypoints. It also reports its GatewayClass `Accepted`.
//!
//! - [`gateway`]: the slice of the Gateway API `Gateway` and `GatewayClass` we read.
//! - [`desired`]: pure functions from a Gateway to the objects and status it should have, and
//!   from a GatewayClass to its status.
//! - [`reconcile`]: the I/O edge — server-side apply, status, cleanup, the kube-runtime
//!   controller.
//! - [`metrics`]: reconcile counters.

pub mod desired;
pub mod gateway;
pub mod metrics;
pub mod reconcile;

pub use desired::{Settings, desired, desired_status};
pub use gateway::{Gateway, GatewayClass};
pub use metrics::{ControllerMetrics, Outcome};
pub use reconcile::{
    Context, Error, class_error_policy, cleanup, error_policy, reconcile, reconcile_class, run,
};
