//! [`StreamSource`] over the real SDK clients (AWS, or moto in tests).

use aws_sdk_dynamodbstreams::config::http::HttpResponse;
use aws_sdk_dynamodbstreams::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodbstreams::types::ShardIteratorType;

use super::source::{
    Position, RecordsPage, ShardId, ShardInfo, ShardIterator, ShardPage, SourceError, StreamSource, TableStream,
};
use std::sync::Arc;

use crate::aws::errors;
use crate::dependency::{Dependencies, DependencyHealth};

/// Reads through the DynamoDB client (DescribeTable) and the Streams client (everything else).
#[derive(Clone, Debug)]
pub struct AwsSource {
    dynamodb: aws_sdk_dynamodb::Client,
    streams: aws_sdk_dynamodbstreams::Client,
    /// Where each call's outcome is reported (`dependency_up`, `/readyz`).
    health: Option<Arc<Dependencies>>,
}

impl AwsSource {
    pub fn new(dynamodb: aws_sdk_dynamodb::Client, streams: aws_sdk_dynamodbstreams::Client) -> Self {
        Self { dynamodb, streams, health: None }
    }

    /// Reports DescribeTable to `health.dynamodb` and the stream calls to `health.streams`.
    pub fn with_health(mut self, health: Arc<Dependencies>) -> Self {
        self.health = Some(health);
        self
    }

    /// A failure that says the service is not answering (not one about a shard or position).
    fn report<T>(&self, dependency: fn(&Dependencies) -> &DependencyHealth, result: &Result<T, SourceError>) {
        let Some(health) = &self.health else { return };
        match result {
            Ok(_) => dependency(health).ok(),
            Err(e @ (SourceError::Throttled(_) | SourceError::Other(_))) => dependency(health).failed(e),
            Err(_) => dependency(health).ok(),
        }
    }
}

/// Error text goes into logs and status; moto's HTML bodies must not flood them.
const MAX_ERROR_TEXT: usize = 400;

/// What a failed stream operation means for the tailer.
fn classify<E>(context: &str, err: SdkError<E, HttpResponse>) -> SourceError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let mut text = format!("{context}: {}", DisplayErrorContext(&err));
    if text.len() > MAX_ERROR_TEXT {
        let end = text.char_indices().map(|(i, _)| i).take_while(|&i| i <= MAX_ERROR_TEXT).last().unwrap_or(0);
        text.truncate(end);
        text.push_str("...");
    }
    match errors::code(&err) {
        Some("ExpiredIteratorException") => SourceError::ExpiredIterator(text),
        Some("TrimmedDataAccessException") => SourceError::TrimmedDataAccess(text),
        Some("ResourceNotFoundException") => SourceError::ResourceNotFound(text),
        _ => match errors::classify(&err) {
            errors::Class::Transient => SourceError::Throttled(text),
            // A dropped connection may be the iterator's fault: the reader counts these apart.
            errors::Class::NoAnswer | errors::Class::Code | errors::Class::Other => SourceError::Other(text),
        },
    }
}

fn iterator_type(position: &Position) -> (ShardIteratorType, Option<&str>) {
    match position {
        Position::TrimHorizon => (ShardIteratorType::TrimHorizon, None),
        Position::Latest => (ShardIteratorType::Latest, None),
        Position::AfterSequenceNumber(s) => (ShardIteratorType::AfterSequenceNumber, Some(s)),
        Position::AtSequenceNumber(s) => (ShardIteratorType::AtSequenceNumber, Some(s)),
    }
}

impl StreamSource for AwsSource {
    async fn describe_table(&self, table: &str) -> Result<TableStream, SourceError> {
        let result = self.describe_table_call(table).await;
        self.report(|h| &h.dynamodb, &result);
        // The service answers, but there is nothing to serve or follow: degraded all the same.
        if let Some(health) = &self.health {
            match &result {
                Ok(TableStream::TableMissing) => health.dynamodb.failed(format!("the table {table} does not exist")),
                Ok(TableStream::Disabled) => health.streams.failed(format!("the table {table} has no enabled stream")),
                _ => {}
            }
        }
        result
    }

    async fn describe_stream(
        &self,
        stream_arn: &str,
        exclusive_start: Option<&ShardId>,
    ) -> Result<ShardPage, SourceError> {
        let result = self.describe_stream_call(stream_arn, exclusive_start).await;
        self.report(|h| &h.streams, &result);
        result
    }

    async fn get_shard_iterator(
        &self,
        stream_arn: &str,
        shard: &ShardId,
        position: &Position,
    ) -> Result<ShardIterator, SourceError> {
        let result = self.get_shard_iterator_call(stream_arn, shard, position).await;
        self.report(|h| &h.streams, &result);
        result
    }

    async fn get_records(&self, iterator: &ShardIterator) -> Result<RecordsPage, SourceError> {
        let result = self.get_records_call(iterator).await;
        self.report(|h| &h.streams, &result);
        result
    }
}

impl AwsSource {
    async fn describe_table_call(&self, table: &str) -> Result<TableStream, SourceError> {
        let out = match self.dynamodb.describe_table().table_name(table).send().await {
            Ok(out) => out,
            Err(err) => {
                return match classify(&format!("DescribeTable {table}"), err) {
                    SourceError::ResourceNotFound(_) => Ok(TableStream::TableMissing),
                    other => Err(other),
                };
            }
        };
        let Some(t) = out.table else {
            return Err(SourceError::Other(format!("DescribeTable {table}: the answer has no Table")));
        };
        let spec = t.stream_specification.as_ref().filter(|s| s.stream_enabled);
        match (spec, t.latest_stream_arn) {
            (Some(spec), Some(arn)) => Ok(TableStream::Enabled {
                arn,
                view_type: spec.stream_view_type.as_ref().map(|v| v.as_str().to_string()),
            }),
            _ => Ok(TableStream::Disabled),
        }
    }

    async fn describe_stream_call(
        &self,
        stream_arn: &str,
        exclusive_start: Option<&ShardId>,
    ) -> Result<ShardPage, SourceError> {
        let out = self
            .streams
            .describe_stream()
            .stream_arn(stream_arn)
            .set_exclusive_start_shard_id(exclusive_start.map(|s| s.0.clone()))
            .send()
            .await
            .map_err(|err| classify(&format!("DescribeStream {stream_arn}"), err))?;
        let Some(desc) = out.stream_description else {
            return Err(SourceError::Other(format!(
                "DescribeStream {stream_arn}: the answer has no StreamDescription"
            )));
        };
        let mut shards = Vec::with_capacity(desc.shards.as_ref().map_or(0, Vec::len));
        for shard in desc.shards.unwrap_or_default() {
            // A shard without an id cannot be read; skipping it is all we can do.
            let Some(id) = shard.shard_id else {
                tracing::warn!(stream = stream_arn, "DescribeStream listed a shard without a ShardId; ignored");
                continue;
            };
            let range = shard.sequence_number_range;
            shards.push(ShardInfo {
                id: ShardId(id),
                parent: shard.parent_shard_id.map(ShardId),
                starting_sequence_number: range.as_ref().and_then(|r| r.starting_sequence_number.clone()),
                ending_sequence_number: range.and_then(|r| r.ending_sequence_number),
            });
        }
        Ok(ShardPage { shards, last_evaluated_shard_id: desc.last_evaluated_shard_id.map(ShardId) })
    }

    async fn get_shard_iterator_call(
        &self,
        stream_arn: &str,
        shard: &ShardId,
        position: &Position,
    ) -> Result<ShardIterator, SourceError> {
        let (kind, sequence) = iterator_type(position);
        let out = self
            .streams
            .get_shard_iterator()
            .stream_arn(stream_arn)
            .shard_id(shard.as_str())
            .shard_iterator_type(kind)
            .set_sequence_number(sequence.map(str::to_string))
            .send()
            .await
            .map_err(|err| classify(&format!("GetShardIterator {shard} {position}"), err))?;
        out.shard_iterator.map(ShardIterator).ok_or_else(|| {
            SourceError::Other(format!("GetShardIterator {shard} {position}: the answer has no ShardIterator"))
        })
    }

    async fn get_records_call(&self, iterator: &ShardIterator) -> Result<RecordsPage, SourceError> {
        let out = self
            .streams
            .get_records()
            .shard_iterator(iterator.0.as_str())
            .send()
            .await
            .map_err(|err| classify("GetRecords", err))?;
        Ok(RecordsPage {
            records: out.records.unwrap_or_default(),
            next_iterator: out.next_shard_iterator.map(ShardIterator),
        })
    }
}
