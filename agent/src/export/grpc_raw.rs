//! The OTLP gRPC export call with a request that is already protobuf bytes.
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

use super::settings::{Compression, Signal};

pub struct RawGrpcClient {
    grpc: tonic::client::Grpc<Channel>,
    path: &'static str,
}

impl RawGrpcClient {
    pub fn new(channel: Channel, signal: Signal, compression: Compression) -> Self {
        let mut grpc = tonic::client::Grpc::new(channel);
        if compression == Compression::Gzip {
            grpc = grpc.send_compressed(tonic::codec::CompressionEncoding::Gzip);
        }
        Self { grpc, path: signal.grpc_path() }
    }

    /// Sends one encoded export request; `headers` become request metadata (names that are not
    /// valid metadata keys are skipped). A connection failure keeps its cause as the source, so
    /// a TLS problem can be explained.
    pub async fn export(&mut self, body: Bytes, headers: &[(String, String)]) -> Result<(), Status> {
        self.grpc.ready().await.map_err(|e| {
            let message = format!("collector not reachable: {e}");
            let mut status = Status::unavailable(message);
            status.set_source(std::sync::Arc::new(e));
            status
        })?;
        let mut req = tonic::Request::new(body);
        for (k, v) in headers {
            if let (Ok(k), Ok(v)) =
                (k.to_ascii_lowercase().parse::<MetadataKey<Ascii>>(), v.parse::<MetadataValue<Ascii>>())
            {
                req.metadata_mut().insert(k, v);
            }
        }
        self.grpc.unary(req, PathAndQuery::from_static(self.path), RawCodec).await.map(|_| ())
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
