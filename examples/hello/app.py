"""The example app: says hello, and which release and greeting it runs with."""
import os

from flask import Flask, jsonify

app = Flask(__name__)


@app.route("/")
def index():
    greeting = os.environ.get("GREETING", "Hello")
    release = os.environ.get("BERTH_RELEASE", "?")
    return (f"<h1>{greeting} from Berth!</h1>\n"
            f"<p>app {os.environ.get('BERTH_APP', '?')}, release v{release}</p>\n")


@app.route("/env/<key>")
def env(key):
    return jsonify({key: os.environ.get(key)})
