"""Teacher sources: where the teacher's signal comes from."""

from kdlab.teachers.base import TEACHERS, TeacherSignal, TeacherSource
from kdlab.teachers.online import OnlineTeacher

__all__ = ["TEACHERS", "OnlineTeacher", "TeacherSignal", "TeacherSource"]
