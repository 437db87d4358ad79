"""The registry of what a reset clears.

Each entry names a table of per-learner, per-course rows. A reset deletes every
row of the learner in that course from each table listed here (R4), and the job
reports the rows cleared per entry. Adding a new kind of course content means
adding one entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Table

from models.schema import (
    AssessmentResult,
    AssignmentSubmission,
    Certificate,
    CourseCompletion,
    DiscussionPost,
    LessonProgress,
)


@dataclass(frozen=True)
class ResetComponent:
    name: str
    table: Table


RESET_COMPONENTS: tuple[ResetComponent, ...] = (
    ResetComponent("lesson_progress", LessonProgress.__table__),
    ResetComponent("assessment_results", AssessmentResult.__table__),
    ResetComponent("discussion_posts", DiscussionPost.__table__),
    ResetComponent("assignment_submissions", AssignmentSubmission.__table__),
    ResetComponent("course_completions", CourseCompletion.__table__),
    ResetComponent("certificates", Certificate.__table__),
)

