"""The chat page's entry point (MicroPython by default, Pyodide with ?runtime=pyodide)."""

from tokenwire.browser.app import App

App().start()
