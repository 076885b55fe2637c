"""CDS Hooks 2.0 wire models, for the OpenAPI document and for validating feedback.

Service calls are parsed from raw bytes with orjson for speed and validated by the use case; these
models document the same shapes. Response models mirror the spec (no empty elements are emitted).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("contains U+0000")  # FHIR strings may not hold it, and PostgreSQL cannot store it
    return value


#: A string without U+0000: the members of inbound documents that are stored (feedback).
Text = Annotated[str, AfterValidator(_no_nul)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Coding(BaseModel):
    system: Text = Field(min_length=1)
    code: Text = Field(min_length=1)
    display: Text | None = None


class FhirAuthorization(_Open):
    access_token: str
    token_type: str | None = None
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None


class CdsRequest(_Open):
    hook: str = Field(min_length=1, description="Must equal the service's hook")
    hookInstance: str = Field(min_length=1)
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: dict[str, Any] = Field(description="Hook context; context.patientId is required")
    prefetch: dict[str, Any] | None = Field(None, description="Prefetch results by key; null values mean 'no data'")


class Source(BaseModel):
    label: str
    url: str | None = None
    topic: Coding | None = None


class Action(BaseModel):
    type: Literal["create", "update", "delete"]
    description: str
    resource: dict[str, Any] | None = None
    resourceId: str | None = None


class Suggestion(BaseModel):
    label: str
    uuid: str | None = None
    isRecommended: bool | None = None
    actions: list[Action] | None = None


class Card(BaseModel):
    uuid: str | None = None
    summary: str = Field(max_length=139)
    detail: str | None = None
    indicator: Literal["info", "warning", "critical"]
    source: Source
    suggestions: list[Suggestion] | None = None
    selectionBehavior: Literal["at-most-one", "any"] | None = None
    overrideReasons: list[Coding] | None = None


class CdsResponse(BaseModel):
    cards: list[Card]


class ServiceDescriptor(BaseModel):
    hook: str
    title: str | None = None
    description: str
    id: str
    prefetch: dict[str, str] | None = None
    usageRequirements: str | None = None


class Discovery(BaseModel):
    services: list[ServiceDescriptor]


class OverrideReason(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Coding | None = None
    userComment: Text | None = None


class AcceptedSuggestion(BaseModel):
    id: Text = Field(min_length=1)


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    card: Text = Field(min_length=1, max_length=64)
    outcome: Literal["accepted", "overridden"]
    outcomeTimestamp: str = Field(min_length=1, json_schema_extra={"format": "date-time"})
    acceptedSuggestions: list[AcceptedSuggestion] | None = Field(None, min_length=1, description="Required when outcome is accepted")
    overrideReason: OverrideReason | None = None
    extension: dict[str, Any] | None = None


class FeedbackRequest(BaseModel):
    feedback: list[FeedbackItem] = Field(min_length=1, max_length=100)


class OperationOutcomeIssue(BaseModel):
    severity: str
    code: str
    diagnostics: str | None = None


class OperationOutcome(BaseModel):
    resourceType: Literal["OperationOutcome"]
    issue: list[OperationOutcomeIssue]
