//! The OTLP gRPC trace call with a request that is already protobuf bytes.
//!
//! The pipeline encodes each batch once (`otlp_wire`); the generated tonic client would want
//! the message structs instead. This client sends the bytes as the message and ignores the
//! response body (like the HTTP exporter, only the status matters).

use bytes::{Buf, BufMut, Bytes};
use hyper::http::uri::PathAndQuery;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::{Ascii, MetadataKey, MetadataValue},
    transport::Channel,
};

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

pub struct RawGrpcClient(tonic::client::Grpc<Channel>);

impl RawGrpcClient {
    pub fn new(channel: Channel) -> Self {
        Self(tonic::client::Grpc::new(channel))
    }

    /// Sends one encoded `ExportTraceServiceRequest`; `headers` become request metadata
    /// (names that are not valid metadata keys are skipped).
    pub async fn export_traces(&mut self, body: Bytes, headers: &[(String, String)]) -> Result<(), Status> {
        self.0.ready().await.map_err(|e| Status::unavailable(format!("collector not ready: {e}")))?;
        let mut req = tonic::Request::new(body);
        for (k, v) in headers {
            if let (Ok(k), Ok(v)) =
                (k.to_ascii_lowercase().parse::<MetadataKey<Ascii>>(), v.parse::<MetadataValue<Ascii>>())
            {
                req.metadata_mut().insert(k, v);
            }
        }
        self.0.unary(req, PathAndQuery::from_static(EXPORT_PATH), RawCodec).await.map(|_| ())
    }
}

/// Messages are bytes both ways: sent as they are, the response skipped.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}
