"""Chat with a DeepSeek-VL: the conversation (history, images, the prompt that fits), incremental
detokenization and the engine that streams answers. The front ends are chat.py (terminal) and demo.py (web)."""

from dvl_jax.chat.chatbot import Chatbot, Reply, Sampling
from dvl_jax.chat.conversation import ContextTooLong, Conversation, Prompt, Turn
from dvl_jax.chat.detokenizer import IncrementalDetokenizer

__all__ = ["Chatbot", "ContextTooLong", "Conversation", "IncrementalDetokenizer", "Prompt", "Reply", "Sampling",
           "Turn"]
