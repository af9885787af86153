//! Service-graph metrics as Tempo's metrics-generator names them, so Grafana's service graph works
//! from Prometheus alone: per edge (`client`, `server`, `connection_type`) a request count, a
//! failed-request count, and the server's and the client's view of the duration.
//!
//! Edges come from connections, not from guesses: both ends traced here (the server end found
//! its client socket), or a client span towards a peer that is not traced (a virtual node named
//! `address:port`, or the database system).

use std::{collections::HashMap, sync::Mutex};

use super::{instruments::DURATION_BOUNDS, store::HistogramPoint};
use crate::trace::span::Text;

/// Prometheus/OTLP names (Tempo's).
pub const REQUEST_TOTAL: &str = "traces_service_graph_request_total";
pub const REQUEST_FAILED_TOTAL: &str = "traces_service_graph_request_failed_total";
pub const SERVER_SECONDS: &str = "traces_service_graph_request_server_seconds";
pub const CLIENT_SECONDS: &str = "traces_service_graph_request_client_seconds";

/// `connection_type` of an edge: both ends traced (empty, as Tempo has it), a peer that is not
/// traced, a database that is not traced.
pub const DIRECT: &str = "";
pub const VIRTUAL_NODE: &str = "virtual_node";
pub const DATABASE: &str = "database";

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Edge {
    pub client: Text,
    pub server: Text,
    pub connection_type: &'static str,
    /// The edge stands for every edge beyond the cap (`otel.metric.overflow`).
    pub overflow: bool,
}

#[derive(Clone, Debug)]
pub struct EdgePoint {
    pub total: u64,
    pub failed: u64,
    pub server: HistogramPoint,
    pub client: HistogramPoint,
}

pub struct ServiceGraph {
    max_edges: usize,
    edges: Mutex<HashMap<Edge, EdgePoint>>,
}

/// Which end a measurement comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The server span of an edge whose client is traced: counts the request.
    Server,
    /// The client span of an edge whose server is traced (the server end counted the request).
    ClientOfTraced,
    /// The client span towards a peer that is not traced: counts the request.
    ClientOnly,
}

impl ServiceGraph {
    pub fn new(max_edges: usize) -> Self {
        Self { max_edges, edges: Mutex::new(HashMap::new()) }
    }

    /// Records one request's measurement on an edge.
    pub fn record(&self, mut edge: Edge, end: End, seconds: f64, failed: bool, now_unix_ns: u64) {
        let Ok(mut edges) = self.edges.lock() else { return };
        if !edges.contains_key(&edge) && edges.len() >= self.max_edges {
            edge = Edge { client: Text::default(), server: Text::default(), connection_type: DIRECT, overflow: true };
        }
        let point = edges.entry(edge).or_insert_with(|| EdgePoint {
            total: 0,
            failed: 0,
            server: HistogramPoint::new(DURATION_BOUNDS.len(), now_unix_ns),
            client: HistogramPoint::new(DURATION_BOUNDS.len(), now_unix_ns),
        });
        if end != End::ClientOfTraced {
            point.total += 1;
            point.failed += u64::from(failed);
        }
        match end {
            End::Server => point.server.record(DURATION_BOUNDS, seconds),
            End::ClientOfTraced | End::ClientOnly => point.client.record(DURATION_BOUNDS, seconds),
        }
    }

    /// Every edge, copied.
    pub fn snapshot(&self) -> Vec<(Edge, EdgePoint)> {
        self.edges.lock().map(|e| e.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(client: &str, server: &str) -> Edge {
        Edge { client: client.into(), server: server.into(), connection_type: DIRECT, overflow: false }
    }

    #[test]
    fn each_request_is_counted_once_with_both_durations() {
        let g = ServiceGraph::new(10);
        g.record(edge("a", "b"), End::Server, 0.002, false, 1);
        g.record(edge("a", "b"), End::ClientOfTraced, 0.003, false, 1);
        g.record(edge("a", "b"), End::Server, 0.2, true, 2);
        let snap = g.snapshot();
        let (_, p) = &snap[0];
        assert_eq!((p.total, p.failed, p.server.count, p.client.count), (2, 1, 2, 1));
    }

    #[test]
    fn edges_beyond_the_cap_go_to_one_overflow_edge() {
        let g = ServiceGraph::new(1);
        g.record(edge("a", "b"), End::ClientOnly, 0.1, false, 1);
        g.record(edge("a", "c"), End::ClientOnly, 0.1, false, 1);
        g.record(edge("a", "d"), End::ClientOnly, 0.1, false, 1);
        let snap = g.snapshot();
        assert_eq!(snap.len(), 2);
        let overflow = snap.iter().find(|(e, _)| e.overflow).expect("overflow edge");
        assert_eq!(overflow.1.total, 2);
    }
}
