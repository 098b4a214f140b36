"""Black-box teachers (the query stage): the Teacher protocol and output kinds, in-process
teachers, and the persistent response cache every query goes through."""

from kdd_jax.teachers.base import OUTPUT_KINDS, Teacher, TeacherError, TeacherOutput, validate_output
from kdd_jax.teachers.cache import CacheStats, CachedTeacher, QueryBudgetExceeded, ResponseCache, probe_key
from kdd_jax.teachers.http import HttpTeacher
from kdd_jax.teachers.local import CallableTeacher, InputSpec, flax_teacher, logits_to_output

__all__ = [
    "OUTPUT_KINDS",
    "CacheStats",
    "CachedTeacher",
    "CallableTeacher",
    "HttpTeacher",
    "InputSpec",
    "QueryBudgetExceeded",
    "ResponseCache",
    "Teacher",
    "TeacherError",
    "TeacherOutput",
    "flax_teacher",
    "logits_to_output",
    "probe_key",
    "validate_output",
]
