//! Spans as sonde exports them: identifiers, W3C trace context, sampling, the route heuristic,
//! and the mapping from a protocol exchange to semantic-convention attributes.

pub mod assemble;
pub mod context;
pub mod db_attrs;
pub mod http_attrs;
pub mod ids;
pub mod join;
pub mod parent;
pub mod resource;
pub mod route;
pub mod rpc_attrs;
pub mod sampler;
pub mod serving_thread;
pub mod span;
