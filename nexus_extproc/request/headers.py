"""Header names and metadata namespaces: the public contract (SPEC §5, §2.6) in one place."""

UPSTREAM_HEADER = "x-nexus-upstream"
CLIENT_HEADER_PREFIX = "x-nexus-"

H_COST_ESTIMATED = "x-nexus-cost-estimated"
H_BUDGET_STATUS = "x-nexus-budget-status"
H_BUDGET_UTILIZATION = "x-nexus-budget-utilization"
H_BUDGET_REMAINING = "x-nexus-budget-remaining"
H_BUDGET_UNIT = "x-nexus-budget-unit"  # "tokens" when a token budget decided (remaining is then in tokens)
H_BACKEND_TYPE = "x-nexus-backend-type"
H_ROUTE_REASON = "x-nexus-route-reason"
H_TOKEN_TIER = "x-nexus-token-tier"
H_REQUEST_ID = "x-nexus-request-id"
H_BUDGET_NAME = "x-nexus-budget-name"  # which budget's status decided (with several budgets)

# Identity headers: used for budget scopes only when identity.trust_identity_headers is set.
H_USER = "x-nexus-user"
H_TEAM = "x-nexus-team"
H_AGENT = "x-nexus-agent"
H_TASK = "x-nexus-task"  # attribution only (reports), never budget selection
H_TAGS = "x-nexus-tags"

METADATA_NAMESPACE = "nexus.extproc"
# Where response headers are skipped (envoy/nexus.yaml), Envoy's header_to_metadata filter puts the response's
# content-encoding here (key `content_encoding`) and ext_proc forwards it with the first body message.
RESPONSE_METADATA_NAMESPACE = "nexus.response"
# Where Envoy's sse_to_metadata filter keeps a stream's usage (`usage`, `start_usage`, `model`) when Envoy settles
# streams (server.settlement: envoy); the access log brings it to the server.
USAGE_METADATA_NAMESPACE = "nexus.usage"

# Credentials a cloud provider issued must not travel to a local model after a reroute.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")
