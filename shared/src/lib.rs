//! PayFence core: what every function links. Domain records, limits arithmetic,
//! the authorize use case, secrets, auth, HTTP conventions and the stores.

pub mod auth;
pub mod aws;
pub mod config;
pub mod domain;
pub mod gateway;
pub mod http;
pub mod ids;
pub mod lambda;
pub mod limits;
pub mod origin;
pub mod seal;
pub mod state;
pub mod store;
pub mod telemetry;

pub use state::AppState;
