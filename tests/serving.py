"""Test helper: the package's loopback server runner, under the name the live suites import."""

from mlx_gemma.server.background import free_socket, serving

__all__ = ["free_socket", "serving"]
