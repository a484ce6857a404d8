//! `cruddur-syncd cognito ...`: the user pool, as lines on the terminal (the listing itself is
//! [`crate::cognito`]'s).

use std::io::Write;

use aws_sdk_cognitoidentityprovider::types::{
    AttributeType, ExplicitAuthFlowsType, MessageActionType, UserPoolClientDescription, UserType,
};
use aws_sdk_cognitoidentityprovider::Client;
use serde::Serialize;

use super::JsonLines;
use crate::aws::errors::code as sdk_code;
use crate::aws::from_sdk;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::{demo, model};

#[derive(Serialize)]
pub(crate) struct UserLine {
    pub username: Option<String>,
    pub sub: Option<String>,
    pub preferred_username: Option<String>,
    pub email: Option<String>,
    pub status: Option<String>,
    pub enabled: bool,
    pub created: Option<String>,
    pub attributes: std::collections::BTreeMap<String, String>,
}

impl UserLine {
    pub(crate) fn from_user(u: &UserType) -> Self {
        let attributes: std::collections::BTreeMap<String, String> =
            u.attributes().iter().map(|a| (a.name().to_string(), a.value().unwrap_or_default().to_string())).collect();
        UserLine {
            username: u.username().map(str::to_string),
            sub: attributes.get("sub").cloned(),
            preferred_username: attributes.get("preferred_username").cloned(),
            email: attributes.get("email").cloned(),
            status: u.user_status().map(|s| s.as_str().to_string()),
            enabled: u.enabled(),
            created: u
                .user_create_date()
                .and_then(|d| chrono::DateTime::from_timestamp(d.secs(), d.subsec_nanos()))
                .map(model::rfc3339),
            attributes,
        }
    }
}

pub async fn list_users(cfg: &Config, client: &Client, endpoint: &str, out: &mut JsonLines<impl Write>) -> Result<()> {
    let mut pacer = crate::cognito::Pacer::unlimited();
    let n = crate::cognito::for_each_user_page(client, endpoint, &cfg.auth.user_pool_id, &mut pacer, |users| {
        users.iter().try_for_each(|u| out.emit(&UserLine::from_user(u)))
    })
    .await?;
    tracing::info!(users = n, pool = %cfg.auth.user_pool_id, "listed users");
    Ok(())
}

pub(crate) const LOCAL_POOL_NAME: &str = "cruddur-local";
pub(crate) const LOCAL_CLIENT_NAME: &str = "cruddur-syncd-local";

#[derive(Serialize)]
struct CognitoSeedReport {
    user_pool_id: String,
    client_id: String,
    users_created: usize,
    users_present: usize,
    matches_config: bool,
}

fn attribute(name: &str, value: &str) -> Result<AttributeType> {
    AttributeType::builder()
        .name(name)
        .value(value)
        .build()
        .map_err(|e| Error::Failed(format!("cannot build Cognito request: {e}")))
}

/// Local development only: a pool, an app client and the demo users in an emulator. Refuses to
/// run against real AWS, where pools are infrastructure, not demo data.
pub async fn seed(cfg: &Config, client: &Client, endpoint: &str, out: &mut JsonLines<impl Write>) -> Result<()> {
    if cfg.aws.cognito_endpoint().is_none() {
        return Err(Error::Usage(
            "cognito seed only runs against a local emulator (set aws.endpoint_url or aws.cognito_endpoint_url)".into(),
        ));
    }
    let ctx = |op: &str| format!("Cognito {op} at {endpoint}");
    let pool_id = match find_pool(client, endpoint).await? {
        Some(id) => id,
        None => client
            .create_user_pool()
            .pool_name(LOCAL_POOL_NAME)
            .send()
            .await
            .map_err(|e| from_sdk(ctx("CreateUserPool"), e))?
            .user_pool
            .and_then(|p| p.id)
            .ok_or_else(|| Error::Failed(format!("Cognito at {endpoint} created a pool without an id")))?,
    };
    let client_id = match find_client(client, endpoint, &pool_id).await? {
        Some(id) => id,
        None => client
            .create_user_pool_client()
            .user_pool_id(&pool_id)
            .client_name(LOCAL_CLIENT_NAME)
            .explicit_auth_flows(ExplicitAuthFlowsType::AllowAdminUserPasswordAuth)
            .explicit_auth_flows(ExplicitAuthFlowsType::AllowRefreshTokenAuth)
            .send()
            .await
            .map_err(|e| from_sdk(ctx("CreateUserPoolClient"), e))?
            .user_pool_client
            .and_then(|c| c.client_id)
            .ok_or_else(|| Error::Failed(format!("Cognito at {endpoint} created a client without an id")))?,
    };
    let (mut created, mut present) = (0, 0);
    for u in demo::users() {
        let res = client
            .admin_create_user()
            .user_pool_id(&pool_id)
            .username(u.handle)
            .user_attributes(attribute("preferred_username", u.handle)?)
            .user_attributes(attribute("email", u.email)?)
            .user_attributes(attribute("email_verified", "true")?)
            .user_attributes(attribute("name", u.display_name)?)
            .message_action(MessageActionType::Suppress)
            .send()
            .await;
        match res {
            Ok(_) => created += 1,
            Err(e) if sdk_code(&e) == Some("UsernameExistsException") => present += 1,
            Err(e) => return Err(from_sdk(ctx("AdminCreateUser"), e)),
        }
        client
            .admin_set_user_password()
            .user_pool_id(&pool_id)
            .username(u.handle)
            .password(demo::PASSWORD)
            .permanent(true)
            .send()
            .await
            .map_err(|e| from_sdk(ctx("AdminSetUserPassword"), e))?;
    }
    let matches_config = cfg.auth.user_pool_id == pool_id && cfg.auth.client_id == client_id;
    if !matches_config {
        tracing::warn!(
            %pool_id, %client_id,
            "the config names another pool or client; set CRUDDUR_SYNCD__AUTH__USER_POOL_ID and CRUDDUR_SYNCD__AUTH__CLIENT_ID to these"
        );
    }
    out.emit(&CognitoSeedReport {
        user_pool_id: pool_id,
        client_id,
        users_created: created,
        users_present: present,
        matches_config,
    })
}

async fn find_pool(client: &Client, endpoint: &str) -> Result<Option<String>> {
    let mut token: Option<String> = None;
    loop {
        let page = client
            .list_user_pools()
            .max_results(60)
            .set_next_token(token.take())
            .send()
            .await
            .map_err(|e| from_sdk(format!("Cognito ListUserPools at {endpoint}"), e))?;
        if let Some(p) = page.user_pools().iter().find(|p| p.name() == Some(LOCAL_POOL_NAME)) {
            return Ok(p.id().map(str::to_string));
        }
        match page.next_token {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(None),
        }
    }
}

async fn find_client(client: &Client, endpoint: &str, pool_id: &str) -> Result<Option<String>> {
    let mut token: Option<String> = None;
    loop {
        let page = client
            .list_user_pool_clients()
            .user_pool_id(pool_id)
            .max_results(60)
            .set_next_token(token.take())
            .send()
            .await
            .map_err(|e| from_sdk(format!("Cognito ListUserPoolClients of pool {pool_id} at {endpoint}"), e))?;
        let found = page
            .user_pool_clients()
            .iter()
            .find(|c: &&UserPoolClientDescription| c.client_name() == Some(LOCAL_CLIENT_NAME));
        if let Some(c) = found {
            return Ok(c.client_id().map(str::to_string));
        }
        match page.next_token {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(None),
        }
    }
}

/// Local development only: a fresh access token for a pool user, to call the API with curl.
pub async fn token(cfg: &Config, client: &Client, endpoint: &str, username: &str, password: &str) -> Result<String> {
    if cfg.aws.cognito_endpoint().is_none() {
        return Err(Error::Usage(
            "cognito token only runs against a local emulator (set aws.endpoint_url or aws.cognito_endpoint_url)"
                .into(),
        ));
    }
    let out = client
        .admin_initiate_auth()
        .user_pool_id(&cfg.auth.user_pool_id)
        .client_id(&cfg.auth.client_id)
        .auth_flow(aws_sdk_cognitoidentityprovider::types::AuthFlowType::AdminUserPasswordAuth)
        .auth_parameters("USERNAME", username)
        .auth_parameters("PASSWORD", password)
        .send()
        .await
        .map_err(|e| from_sdk(format!("Cognito AdminInitiateAuth for {username:?} at {endpoint}"), e))?;
    out.authentication_result
        .and_then(|r| match cfg.auth.token_use {
            crate::config::TokenUse::Id => r.id_token,
            _ => r.access_token,
        })
        .ok_or_else(|| Error::Failed(format!("Cognito at {endpoint} returned no token for {username:?}")))
}
