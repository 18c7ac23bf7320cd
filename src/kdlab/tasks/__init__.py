"""Built-in tasks: data generators with their own scorers and tokenizers (`arith`, `oracle`)."""

from kdlab.tasks.arith import ArithTask
from kdlab.tasks.base import TASKS, Task, get_task
from kdlab.tasks.oracle import OracleTask
from kdlab.tasks.tokenizer import build_char_tokenizer

__all__ = ["TASKS", "ArithTask", "OracleTask", "Task", "build_char_tokenizer", "get_task"]
