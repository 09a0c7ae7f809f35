//! Where clusters and their applications come from: the static config file and Serve's own endpoints.
//!
//! Static discovery is the config's `clusters:` list. Each cluster is then probed ([`probe`]) for
//! health and for the applications its Serve proxy routes.

pub mod kube;
pub mod probe;
pub mod raycluster;
